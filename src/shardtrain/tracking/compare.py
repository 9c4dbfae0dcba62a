"""Compare finished runs: a table of the config keys that differ plus final metrics, and a plot.

    shardtrain compare runs/a runs/b --png compare.png

Each run folder holds config.yaml, metrics.jsonl and final.json (written by `shardtrain train`).
`compare_wandb("entity/project", group=...)` does the same from the W&B server (online only).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from matplotlib.ticker import MaxNLocator

from shardtrain._typed import flatten, load_yaml
from shardtrain.errors import UserError
from shardtrain.tracking.plots import new_figure, save, series

IGNORED_KEYS = ("data.path", "log.name")  # differ between any two runs, say nothing
METRICS = ("best_val_acc", "val_acc", "test_acc", "steps", "train_seconds")


def load_run(run_dir: Path, unfinished: bool = False) -> dict:
    """A run folder -> {"name", "config" (flat, dotted keys), "records", "final"}.

    unfinished=True also takes a run without final.json (final = {}, name marked "unfinished")."""
    run_dir = Path(run_dir)
    names = ("config.yaml", "metrics.jsonl") + (() if unfinished else ("final.json",))
    missing = [f for f in names if not (run_dir / f).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run folder (missing {', '.join(missing)})")
    done = (run_dir / "final.json").is_file()
    try:
        config = load_yaml((run_dir / "config.yaml").read_text()) or {}
        final = json.loads((run_dir / "final.json").read_text()) if done else {}
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise UserError(f"{run_dir}: unreadable run file: {e}".splitlines()[0]) from None
    name = run_dir.name if done else f"{run_dir.name} (unfinished)"
    return {"name": name, "config": flatten(config), "records": records, "final": final}


def differing_keys(configs: list[dict]) -> list[str]:
    keys = sorted(set().union(*configs))
    return [k for k in keys
            if k not in IGNORED_KEYS and len({json.dumps(c.get(k)) for c in configs}) > 1]


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], out_png: Path | None = None, title: str = "",
                 unfinished: bool = False) -> str:
    """Fixed-width table (differing config keys + final metrics) and optional val-curve PNG.
    unfinished=True (sweeps) also shows runs that stopped early (see load_run)."""
    if not run_dirs:
        raise UserError("compare needs at least one run folder")
    runs = [load_run(d, unfinished) for d in run_dirs]
    keys = differing_keys([r["config"] for r in runs])
    header = ["run", *keys, *METRICS]
    rows = [[r["name"], *(format_value(r["config"].get(k)) for k in keys),
             *(format_value(r["final"].get(m)) for m in METRICS)] for r in runs]
    if out_png is not None:
        plot_runs(runs, out_png, title)
    return format_table(header, rows)


def plot_runs(runs: list[dict], out_png: Path, title: str = "") -> Path:
    """Two panels, val acc and val loss vs epoch, one line per run (legend below both)."""
    legend_rows = -(-len(runs) // 2)
    height = 4.0 + 0.2 * legend_rows + 0.3  # inches: panels + legend (2 columns) + margin
    fig, (acc_ax, loss_ax) = new_figure(11, height, cols=2)
    for run in runs:
        for ax, key in ((acc_ax, "val/acc"), (loss_ax, "val/loss")):
            ax.plot(*series(run["records"], "epoch", "epoch", key), marker="x", label=run["name"])
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy")
    loss_ax.set(title="Validation loss", xlabel="epoch", ylabel="loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.legend(*acc_ax.get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=8)
    return save(fig, out_png, rect=(0, (0.2 * legend_rows + 0.3) / height, 1, 1))


def compare_wandb(entity_project: str, group: str | None = None) -> str:
    """Same table from the W&B server: runs of `entity/project` (optionally one group)."""
    import wandb

    try:
        api = wandb.Api(timeout=20)
        filters = {"group": group} if group else None
        runs = list(api.runs(entity_project, filters=filters))
    except Exception as e:  # no network, no API key, unknown project: all one message
        raise UserError(f"cannot reach W&B for {entity_project} (offline? `wandb login`?): "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from None
    if not runs:
        raise UserError(f"no W&B runs in {entity_project}" + (f" group {group}" if group else ""))
    configs = [flatten({k: v for k, v in r.config.items() if not k.startswith("_")}) for r in runs]
    keys = differing_keys(configs)
    header = ["run", *keys, *METRICS]
    rows = [[r.name, *(format_value(c.get(k)) for k in keys),
             *(format_value(r.summary.get(m)) for m in METRICS)] for r, c in zip(runs, configs)]
    return format_table(header, rows)
