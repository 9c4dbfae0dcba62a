"""Grid sweeps: every point of a Cartesian grid is one `shardtrain train` run, then a compare table.

    shardtrain sweep --recipe fashion-mnist-mlp --data shards/fmnist \
        --grid optim.max_lr=0.001,0.01 --grid optim.name=adam,sgd [--out runs/sweep-x] [k=v ...]
    shardtrain sweep --grid-file optimizer --data shards/fmnist        # a shipped sweep file
    shardtrain sweep --grid-file my.yaml --data ... --slurm            # a SLURM job array

Sequentially (the default) point i trains in a subprocess into SWEEP_DIR/point-XX-<desc> with
`--resume auto` (an interrupted sweep run again picks up where it stopped; finished points are
skipped), then SWEEP_DIR/compare.txt, compare.png (val accuracy and loss per epoch, one line per
point; a failed point shows its epochs up to the failure) and weights.png (each point's weights
per layer) are written and the table printed.
With --slurm the override lines go to SWEEP_DIR/grid.txt and `sbatch --array=0-(n-1)
slurm/sweep.sbatch` trains point i into SWEEP_DIR/point-i; compare with
`shardtrain compare SWEEP_DIR/point-*` when the array is done.
Every point logs to W&B with log.group = the sweep name and tags [sweep, NAME].

A sweep file (YAML; shipped ones in shardtrain/sweeps/, listed by `shardtrain sweep --list`):
    name: optimizer            # sweep name: W&B group, default SWEEP_DIR runs/sweep-NAME
    recipe: fashion-mnist-mlp  # --recipe wins over it
    grid: {optim.name: [sgd, adam, adamw]}
    overrides: [train.epochs=5]  # common to every point; command-line key=value come after
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from safetensors.torch import load_file

from shardtrain._typed import load_yaml
from shardtrain.errors import UserError
from shardtrain.tracking.compare import compare_runs
from shardtrain.tracking.histograms import plot_weight_distributions


@dataclass
class Sweep:
    name: str
    recipe: str
    grid: dict[str, list[str]]  # key -> override texts, in order
    overrides: list[str] = field(default_factory=list)


def list_sweeps() -> list[str]:
    folder = resources.files("shardtrain") / "sweeps"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_sweep_file(name_or_path: str) -> Sweep:
    """A sweep YAML by path or shipped name -> Sweep (unknown keys are errors)."""
    path = Path(name_or_path)
    if not path.is_file():
        if name_or_path not in list_sweeps():
            raise UserError(f"sweep file not found: {name_or_path} (shipped: "
                            f"{', '.join(list_sweeps())})")
        path = Path(str(resources.files("shardtrain") / "sweeps" / f"{name_or_path}.yaml"))
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"sweep file {path} is not valid YAML: {e}".splitlines()[0]) from None
    unknown = set(raw) - {"name", "recipe", "grid", "overrides"}
    if unknown or not isinstance(raw.get("grid"), dict):
        raise UserError(f"sweep file {path}: needs a `grid:` mapping; unknown keys "
                        f"{sorted(unknown)}")
    grid = {k: [to_text(v) for v in (vs if isinstance(vs, list) else [vs])]
            for k, vs in raw["grid"].items()}
    return Sweep(str(raw.get("name") or path.stem), str(raw.get("recipe") or ""), grid,
                 [str(o) for o in raw.get("overrides") or []])


def to_text(value) -> str:
    """A YAML value -> override text: True -> true, [64, 128] -> [64,128], 0.01 -> 0.01."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(to_text(v) for v in value) + "]"
    return str(value)


def parse_grid_arg(text: str) -> tuple[str, list[str]]:
    """`optim.max_lr=0.01,0.1` -> ("optim.max_lr", ["0.01", "0.1"]); commas in [...] stay."""
    key, sep, values = text.partition("=")
    if not sep or "." not in key or not values:
        raise UserError(f"--grid {text!r} must look like section.key=v1,v2,...")
    out, depth, current = [], 0, ""
    for ch in values:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return key, out + [current]


def grid_points(grid: dict[str, list[str]]) -> list[list[str]]:
    """Cartesian product, first key slowest: [["a.x=1", "b.y=2"], ...]."""
    keys = list(grid)
    return [[f"{k}={v}" for k, v in zip(keys, combo)]
            for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(i: int, point: list[str]) -> str:
    """point-03-max_lr-0.01-name-sgd (keys without their section, filesystem-safe); a list value
    [256,128] reads 256_128, an empty one none."""
    parts = []
    for override in point:
        key, value = override.split("=", 1)
        if value.startswith("["):
            value = value.strip("[]").replace(",", "_") or "none"
        parts.append(f"{key.split('.')[-1]}-{value}")
    return f"point-{i:02d}-" + re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(parts))[:60]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "sweep"


def make_sweep(recipe: str, grids: list[str], grid_file: str, name: str) -> Sweep:
    """--grid-file and/or --grid arguments -> one Sweep (--grid keys extend/replace the file's)."""
    sweep = load_sweep_file(grid_file) if grid_file else Sweep("", "", {})
    sweep.grid.update(dict(parse_grid_arg(g) for g in grids))
    sweep.recipe = recipe or sweep.recipe
    if not sweep.recipe:
        raise UserError("sweep needs --recipe (or `recipe:` in the sweep file)")
    if not sweep.grid:
        raise UserError("sweep needs --grid key=v1,v2 or --grid-file FILE")
    sweep.name = safe_name(name or sweep.name
                           or f"sweep-{Path(sweep.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    return sweep


def point_overrides(sweep: Sweep, point: list[str], run_name: str, extra: list[str]) -> list[str]:
    """Sweep logging first, then the file's and the command line's overrides, the point last."""
    return [f"log.group={sweep.name}", f"log.tags=[sweep,{sweep.name}]",
            f"log.name={sweep.name}-{run_name}", *sweep.overrides, *extra, *point]


def run_sweep(sweep: Sweep, data: str, out: Path | None, extra: list[str],
              slurm: bool = False) -> str:
    """Run (or submit) every point; returns the compare table (or the submission message)."""
    out = Path(out or Path("runs") / sweep.name).resolve()
    points = grid_points(sweep.grid)
    recipe = str(Path(sweep.recipe).resolve()) if Path(sweep.recipe).is_file() else sweep.recipe
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(
        {"name": sweep.name, "recipe": recipe, "data": data, "grid": sweep.grid,
         "overrides": sweep.overrides + list(extra), "points": [" ".join(p) for p in points]},
        sort_keys=False))
    if slurm:
        return submit_slurm(sweep, recipe, data, out, points, extra)
    dirs, failed = [], []
    for i, point in enumerate(points):
        run_dir = out / point_name(i, point)
        print(f"sweep {sweep.name}: point {i + 1}/{len(points)} {' '.join(point)} -> {run_dir}",
              flush=True)
        if not (run_dir / "final.json").is_file():
            cmd = [sys.executable, "-m", "shardtrain", "train", "--recipe", recipe,
                   "--data", str(data), "--out", str(run_dir), "--resume", "auto",
                   *point_overrides(sweep, point, run_dir.name, extra)]
            if subprocess.run(cmd).returncode != 0:
                failed.append(run_dir)
        dirs.append(run_dir)
    finished = [d for d in dirs if d not in failed]
    if not finished:
        raise UserError(f"sweep {sweep.name}: every point failed "
                        f"({', '.join(d.name for d in failed)})")
    # a failed point (e.g. a diverged lr) keeps its curves up to the failure in the comparison
    shown = [d for d in dirs if d in finished or is_run_started(d)]
    table = compare_runs(shown, out / "compare.png", f"sweep {sweep.name}", unfinished=True)
    (out / "compare.txt").write_text(table + "\n")
    plot_weight_distributions(
        {d.name: load_file(d / "model.safetensors") for d in finished}, out / "weights.png")
    note = f"\nFAILED: {', '.join(d.name for d in failed)}" if failed else ""
    return (f"{table}\nwrote {out / 'compare.txt'}, {out / 'compare.png'} (val accuracy and loss "
            f"per epoch) and {out / 'weights.png'} (weights per layer){note}")


def is_run_started(run_dir: Path) -> bool:
    return (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()


def sbatch_script() -> Path:
    """slurm/sweep.sbatch of this checkout (SHARDTRAIN_ROOT, the cwd, or next to src/)."""
    roots = [os.environ.get("SHARDTRAIN_ROOT", ""), ".", str(Path(__file__).parents[3])]
    for root in filter(None, roots):
        if (Path(root) / "slurm" / "sweep.sbatch").is_file():
            return (Path(root) / "slurm" / "sweep.sbatch").resolve()
    raise UserError("slurm/sweep.sbatch not found: run from the repo root or set SHARDTRAIN_ROOT")


def submit_slurm(sweep: Sweep, recipe: str, data: str, out: Path, points: list[list[str]],
                 extra: list[str]) -> str:
    """grid.txt (one line of overrides per point) + `sbatch --array=0-(n-1) slurm/sweep.sbatch`."""
    if shutil.which("sbatch") is None:
        raise UserError("--slurm needs `sbatch` on PATH (run on a SLURM login node)")
    script = sbatch_script()
    lines = [" ".join(point_overrides(sweep, p, f"point-{i}", [])) for i, p in enumerate(points)]
    grid_file = out / "grid.txt"
    grid_file.write_text(f"# sweep {sweep.name}: task i = line i\n" + "\n".join(lines) + "\n")
    common = [*sweep.overrides, *extra]
    cmd = ["sbatch", f"--array=0-{len(points) - 1}", f"--job-name=sweep-{sweep.name}",
           str(script), str(grid_file), str(out), "--recipe", recipe,
           "--data", str(Path(data).resolve()), *common]
    result = subprocess.run(cmd, capture_output=True, text=True,
                            env={**os.environ, "SHARDTRAIN_ROOT": str(script.parents[1])})
    if result.returncode != 0:
        raise UserError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split()[-1] if result.stdout.strip() else "?"
    return (f"submitted job array {job} ({len(points)} points, grid {grid_file})\n"
            f"watch: squeue -j {job}; when done: shardtrain compare {out}/point-* "
            f"--png {out}/compare.png (or --wandb ENTITY/PROJECT --group {sweep.name})")
