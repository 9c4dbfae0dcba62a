"""shardtrain: pack image datasets into WebDataset shards, train BatchNorm-ResNet classifiers on
them with HF Accelerate (one CPU to many GPUs and nodes), evaluate, predict and compare runs.

A typical session:
  shardtrain pack /usr/share/datasets/fashion-mnist shards/fmnist     # raw data -> shards
  shardtrain train --recipe fashion-mnist-resnet9 --data shards/fmnist --out runs/a
  accelerate launch -m shardtrain train ...                           # every GPU / node
  shardtrain eval --checkpoint runs/a --data shards/fmnist
  shardtrain compare runs/a runs/b

`shardtrain COMMAND --help` explains a command. Config overrides (section.key=value) may stand
anywhere among a command's options. Exit codes: 0 ok, 1 data error, 2 usage error,
3 non-finite loss, 4 a peer rank died, 75 preempted (requeue me), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shardtrain.errors import ExitCode, UserError


def print_main(message: str) -> None:
    """Print once per job, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def overrides_with_data(args) -> list[str]:
    return list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])


# ---- pack, info, verify -------------------------------------------------------------------
def add_pack(p: argparse.ArgumentParser) -> None:
    p.add_argument("source",
                   help="image folder, CIFAR batches folder, IDX folder or torchvision:NAME")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train carved out as val when the source has no val split")
    p.add_argument("--limit", default="0",
                   help="max samples per split, stratified: N, or N,test=M (per-split caps)")
    p.add_argument("--workers", type=int, default=0, help="encoder processes (0 = all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="auto", choices=["auto", "npy", "png", "jpg"])
    p.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz)")
    p.add_argument("--image-size", type=int, default=0, help="resize to N x N (0 = keep)")
    p.add_argument("--max-size", type=int, default=0,
                   help="shrink images whose longer side exceeds N px, aspect kept (0 = keep)")
    p.add_argument("--channels", type=int, default=0, choices=[0, 1, 3], help="0 = auto")
    p.add_argument("--classes", default="", help="comma-separated class names (IDX sources)")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable input")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run_pack(args) -> None:
    from shardtrain.data.pack import write_shards

    write_shards(args.source, args.out_dir, shard_size=args.shard_size,
                 val_fraction=args.val_fraction, limit=args.limit, workers=args.workers,
                 seed=args.seed, fmt=args.format, compress=args.compress,
                 image_size=args.image_size, max_size=args.max_size, channels=args.channels,
                 classes=[c for c in args.classes.split(",") if c] or None,
                 strict=args.strict, overwrite=args.overwrite)


def add_index(p: argparse.ArgumentParser) -> None:
    from shardtrain.data.adopt_read import IMAGE_EXTS

    p.add_argument("source", help="folder, URL or brace pattern of WebDataset .tar[.gz] shards "
                                  "(e.g. https://host/ds/train-{000000..000099}.tar)")
    p.add_argument("--out", help="write index.json + sidecars here (default: SOURCE, if it is "
                                 "a writable folder)")
    p.add_argument("--label-key", default="", help="label from this .json field (default: "
                                                   ".cls, else .txt)")
    p.add_argument("--classes", default="", help="file with one class name per line")
    p.add_argument("--image-ext", default=",".join(IMAGE_EXTS),
                   help="image member extensions, first found wins")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of the shards (the last ones) for val when names have no "
                        "train-/val-/test- prefix")
    p.add_argument("--split-prefix", action="append", default=[], metavar="SPLIT=PREFIX",
                   help="shards named PREFIX-* (or _ .) belong to SPLIT (train, val, test), "
                        "replacing its default prefixes; repeatable")
    p.add_argument("--channels", type=int, default=0, choices=[0, 1, 3], help="0 = auto")
    p.add_argument("--stats-samples", type=int, default=500,
                   help="train images decoded for mean/std and image size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index.json")


def run_index(args) -> None:
    from shardtrain.data.adopt import index_shards

    index_shards(args.source, args.out, label_key=args.label_key, classes_file=args.classes,
                 image_exts=tuple(e.strip().lower() for e in args.image_ext.split(",") if e),
                 val_fraction=args.val_fraction, channels=args.channels,
                 stats_samples=args.stats_samples, overwrite=args.overwrite,
                 split_prefixes=tuple(args.split_prefix))


def add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="shard folder (holds index.json)")


def run_info(args) -> None:
    from shardtrain.data.inspect import info_text

    print(info_text(args.dir))


def run_verify(args) -> None:
    from shardtrain.data.inspect import verify_shards

    print(verify_shards(args.dir))


# ---- train, recipes, models ---------------------------------------------------------------
def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (`shardtrain recipes`) or YAML")
    p.add_argument("--data", help="shard folder or URL: http(s)://, s3://, gs:// (data.path)")
    p.add_argument("--out", type=Path, help="run folder (default runs/RECIPE-TIME)")
    p.add_argument("--resume", default="", help="auto (latest checkpoint in --out) or a path")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even if the dataset index or config changed (fine-tuning)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (recipe + overrides) as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run_train(args) -> None:
    from shardtrain.config import config_yaml, load_config
    from shardtrain.data.remote import is_url, local_path

    cfg = load_config(args.recipe, overrides_with_data(args))
    if args.print_config:
        print(config_yaml(cfg), end="")
        return
    if cfg.data.path and not is_url(cfg.data.path) and not local_path(cfg.data.path).is_dir():
        raise UserError(f"data folder not found: {cfg.data.path}")
    from shardtrain.peers import fail_fast
    from shardtrain.tracking.wandb_run import default_run_dir
    from shardtrain.train import train

    place_process(cfg)
    out = args.out or default_run_dir(cfg.recipe)  # under `wandb agent`: runs/sweep-S/RUN_ID
    with fail_fast(cfg.train.peer_timeout, setup_timeout=cfg.train.dist_timeout):
        final = train(cfg, out, resume=args.resume, allow_changes=args.allow_changes)
    summary = f"test_acc={final['test_acc']:.4f} " if final.get("test_acc") is not None else ""
    val = f"val_acc={final['val_acc']:.4f} " if final.get("val_acc") is not None else ""
    print_main(f"done: {summary}{val}steps={final['steps']} world_size={final['world_size']} "
               f"run={out}")


def place_process(cfg) -> None:
    """One srun task per device gets its rank from SLURM (topology.py); data.workers=-1 becomes
    this process's share of the CPUs; a launcher's --mixed_precision is said to do nothing."""
    from shardtrain.topology import apply_slurm_topology, default_workers

    described = apply_slurm_topology()
    if described:
        print_main(described)
    if cfg.data.workers < 0:
        cfg.data.workers = default_workers()
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch sets it
    if asked != "no" and asked != cfg.train.precision:
        print_main(f"note: the launcher's mixed precision {asked!r} is not used: shardtrain "
                   f"trains with train.precision={cfg.train.precision} (set it in the recipe or "
                   f"as train.precision=...)")


def run_recipes(args) -> None:
    from shardtrain.config import list_recipes, recipe_header

    for name in list_recipes():
        header = recipe_header(name)
        print(f"{name}\n  {header.get('purpose', '')}\n  result: {header.get('result', '?')}")


def run_models(args) -> None:
    from shardtrain.models import list_models

    print("\n".join(list_models()))


# ---- eval, predict, export, show, lr-find -------------------------------------------------
CHECKPOINT_HELP = ("model.safetensors, checkpoint or run dir, or a W&B model artifact "
                   "wandb:ENTITY/PROJECT/NAME:ALIAS (online)")


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, help="JSON file (default RUN/eval-SPLIT.json)")
    p.add_argument("--batch-size", type=int, default=256)


def run_eval(args) -> None:
    from shardtrain.tools.inference import eval_checkpoint
    from shardtrain.topology import apply_slurm_topology
    from shardtrain.tracking.artifacts import resolve_checkpoint

    apply_slurm_topology()  # srun -n N: one evaluation split N ways, not N evaluations
    checkpoint = resolve_checkpoint(args.checkpoint)  # wandb:ENTITY/PROJECT/NAME:ALIAS too
    ckpt = Path(checkpoint)
    out = args.out or (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval-{args.split}.json"
    r = eval_checkpoint(checkpoint, args.data, args.split, out, args.batch_size)
    print_main(f"{args.split}: acc={r['acc']:.4f} top5={r['top5']:.4f} loss={r['loss']:.4f} "
               f"samples={r['samples']}")
    worst = sorted(r["per_class_acc"].items(), key=lambda kv: kv[1])[:3]
    print_main("lowest per-class accuracy: " + ", ".join(f"{c} {a:.3f}" for c, a in worst))
    print_main(f"wrote {out} and {out.with_suffix('.png')}")


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("images", nargs="+")


def run_predict(args) -> None:
    from shardtrain.tools.inference import predict_images
    from shardtrain.tracking.artifacts import resolve_checkpoint

    failed = 0
    for r in predict_images(resolve_checkpoint(args.checkpoint), args.images, args.topk):
        if "error" in r:
            failed += 1
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}: " + ", ".join(f"{c} ({p:.3f})" for c, p in r["predictions"]))
    if failed:
        sys.exit(ExitCode.DATA_ERROR)


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", type=Path, help="default CKPT_DIR/model.onnx or model.pt")


def run_export(args) -> None:
    from shardtrain.tools.export import export_model
    from shardtrain.tracking.artifacts import resolve_checkpoint

    print(f"wrote {export_model(resolve_checkpoint(args.checkpoint), args.format, args.out)}")


def add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="shard folder (holds index.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=64, help="number of samples (tiles)")
    p.add_argument("--augmented", action="store_true", help="apply the recipe's augmentation")
    p.add_argument("--recipe", default=None, help="recipe for --augmented (name or YAML)")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="recipe override (repeatable), e.g. --set augment.random_erasing=0.5")


def run_show(args) -> None:
    from shardtrain.tools.show import show_samples

    png, tiles = show_samples(args.dir, args.out, split=args.split, n=args.n,
                              augmented=args.augmented, recipe=args.recipe, overrides=args.set)
    print(f"wrote {png} ({tiles} samples)")


def add_lr_find(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", help="shard folder (sets data.path)")
    p.add_argument("--start", type=float, default=1e-6)
    p.add_argument("--end", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path, help="PNG (default runs/lr-find-RECIPE.png; + .json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run_lr_find(args) -> None:
    from shardtrain.config import load_config
    from shardtrain.tools.lr_find import lr_find

    cfg = load_config(args.recipe, overrides_with_data(args))
    place_process(cfg)
    out = args.out or Path("runs") / f"lr-find-{Path(cfg.recipe).stem}.png"
    r = lr_find(cfg, out, start=args.start, end=args.end, steps=args.steps)
    print_main(f"suggested max lr: {r['suggested_lr']:.3g} (steepest descent "
               f"{r['steepest_lr'] or float('nan'):.3g}, min-loss lr / 10 "
               f"{r['min_div10_lr']:.3g}; {r['steps_run']} steps) -> {out}")


# ---- compare, sweep -----------------------------------------------------------------------
def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", type=Path, help="run folders (written by `train`)")
    p.add_argument("--png", type=Path, default=Path("compare.png"),
                   help="val-curve plot of the run folders (default ./compare.png)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="compare W&B runs instead (online)")
    p.add_argument("--group", help="with --wandb: only this group (e.g. a sweep name)")


def run_compare(args) -> None:
    from shardtrain.tracking.compare import compare_runs, compare_wandb

    if args.wandb:
        print(compare_wandb(args.wandb, args.group))
        return
    print(compare_runs(args.runs, args.png))
    print(f"wrote {args.png}")


def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="", help="recipe name or YAML (or the sweep file's)")
    p.add_argument("--data", default="", help="shard folder (required unless --list)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one grid axis (repeatable); points are the Cartesian product")
    p.add_argument("--grid-file", default="", help="sweep YAML or shipped name (--list)")
    p.add_argument("--name", default="", help="sweep name = W&B group (default from the file)")
    p.add_argument("--out", type=Path, help="sweep folder (default runs/NAME)")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM job array instead")
    p.add_argument("--list", action="store_true", help="list the shipped sweep files and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run_sweep(args) -> None:
    from shardtrain.tracking.sweep import list_sweeps, make_sweep, run_sweep

    if args.list:
        print("\n".join(list_sweeps()))
        return
    if not args.data:
        raise UserError("sweep needs --data DIR")
    sweep = make_sweep(args.recipe, args.grid, args.grid_file, args.name)
    print(run_sweep(sweep, args.data, args.out, args.overrides, slurm=args.slurm))


# ---- the command table --------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "pack": Command("pack a dataset into WebDataset shards + index.json", add_pack, run_pack),
    "index": Command("index WebDataset shards written by any tool (folder, URL, pattern)",
                     add_index, run_index),
    "info": Command("summarise a shard folder: classes, counts per split, mean/std", add_dir,
                    run_info),
    "verify": Command("re-hash every shard and decode every sample (exit 1 if damaged)",
                      add_dir, run_verify),
    "train": Command("train a recipe (plain, or under `accelerate launch` / torchrun / srun)",
                     add_train, run_train),
    "eval": Command("evaluate a trained model on a split", add_eval, run_eval),
    "predict": Command("predict the class of image files", add_predict, run_predict),
    "export": Command("standalone ONNX / TorchScript file (normalisation inside)", add_export,
                      run_export),
    "show": Command("PNG grid of samples with labels (--augmented: as trained)", add_show,
                    run_show),
    "lr-find": Command("learning-rate range test: suggested max lr + PNG", add_lr_find,
                       run_lr_find),
    "compare": Command("table (+ PNG) of runs: differing config, final metrics", add_compare,
                       run_compare),
    "sweep": Command("train every point of a grid, then compare them", add_sweep, run_sweep),
    "recipes": Command("list the shipped recipes with their purpose and measured result", None,
                       run_recipes),
    "models": Command("list the registered models", None, run_models),
}


def top_parser() -> argparse.ArgumentParser:
    """`shardtrain --help`: what the tool is for, then one line per command."""
    parser = argparse.ArgumentParser(prog="shardtrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"shardtrain {name}", description=command.help)
    if command.add_arguments is not None:
        command.add_arguments(parser)
    return parser


OPTION_OVERRIDE = re.compile(r"--([A-Za-z_]\w*\.[A-Za-z_]\w*)=(.*)", re.DOTALL)


def override_forms(argv: list[str]) -> list[str]:
    """`--section.key=value` (what `wandb agent` passes for ${args}) -> `section.key=value`
    (its ${args_no_hyphens}); argparse would read the former as an unknown option."""
    return [f"{m[1]}={m[2]}" if (m := OPTION_OVERRIDE.fullmatch(a)) else a for a in argv]


def parse(argv: list[str]) -> tuple[Command, argparse.Namespace]:
    """The command and its arguments; options and overrides may be intermixed (argparse's
    parse_intermixed_args), which a parser with subcommands cannot do, hence one parser each."""
    if not argv or argv[0].startswith("-") or argv[0] not in COMMANDS:
        top_parser().parse_args(argv[:1])  # prints help, or the usage error, and exits
    args = override_forms(argv[1:])
    return COMMANDS[argv[0]], command_parser(argv[0]).parse_intermixed_args(args)


def main(argv: list[str] | None = None) -> None:
    command, args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        command.run(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"shardtrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    main()
