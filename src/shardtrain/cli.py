"""`shardtrain COMMAND ...`: parse the command line, then call one function.

    shardtrain pack SOURCE OUT_DIR [--shard-size N --val-fraction F --limit N --workers N ...]
    shardtrain info DIR | verify DIR
    shardtrain train --recipe NAME|PATH --data DIR [--out RUN_DIR] [--resume auto|PATH] [k=v ...]
    shardtrain eval --checkpoint CKPT --data DIR [--split test]
    shardtrain predict --checkpoint CKPT IMAGE...
    shardtrain compare RUN... [--png OUT] | compare --wandb ENTITY/PROJECT [--group G]
    shardtrain sweep --recipe R --data D --grid k=v1,v2 [--grid-file F] [--out DIR] [--slurm]
    shardtrain show DIR [--split S --n 64 --augmented --recipe R --out PNG]
    shardtrain lr-find --recipe R --data D [--start 1e-6 --end 1 --steps 200] [k=v ...]
    shardtrain export --checkpoint CKPT --format onnx|torchscript [--out FILE]
    shardtrain recipes | models

A user mistake (UserError) prints one line on stderr and exits 2 (corrupt data: 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shardtrain.errors import UserError


def add_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack a dataset into WebDataset shards + index.json")
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
    p.add_argument("--channels", type=int, default=0, choices=[0, 1, 3], help="0 = auto")
    p.add_argument("--classes", default="", help="comma-separated class names (IDX sources)")
    p.add_argument("--strict", action="store_true", help="fail on any unreadable input")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def run_pack(args) -> None:
    from shardtrain.data.pack import write_shards

    write_shards(args.source, args.out_dir, shard_size=args.shard_size,
                 val_fraction=args.val_fraction, limit=args.limit, workers=args.workers,
                 seed=args.seed, fmt=args.format, compress=args.compress,
                 image_size=args.image_size, channels=args.channels,
                 classes=[c for c in args.classes.split(",") if c] or None,
                 strict=args.strict, overwrite=args.overwrite)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (plain or under `accelerate launch`)")
    p.add_argument("--recipe", required=True, help="recipe name (`shardtrain recipes`) or YAML")
    p.add_argument("--data", help="shard folder (sets data.path)")
    p.add_argument("--out", type=Path, help="run folder (default runs/RECIPE-TIME)")
    p.add_argument("--resume", default="", help="auto (latest checkpoint in --out) or a path")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even if the dataset index or config changed (fine-tuning)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")


def run_train(args) -> None:
    from shardtrain.config import load_config
    from shardtrain.loop import NonFiniteLoss
    from shardtrain.train import train

    overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.recipe, overrides)
    if cfg.data.path and not Path(cfg.data.path).is_dir():
        raise UserError(f"data folder not found: {cfg.data.path}")
    out = args.out or Path("runs") / f"{Path(cfg.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        final = train(cfg, out, resume=args.resume, allow_changes=args.allow_changes)
    except NonFiniteLoss as e:
        print_main(f"shardtrain: error: {e}")
        sys.exit(3)
    summary = f"test_acc={final['test_acc']:.4f} " if final.get("test_acc") is not None else ""
    val = f"val_acc={final['val_acc']:.4f} " if final.get("val_acc") is not None else ""
    print_main(f"done: {summary}{val}steps={final['steps']} world_size={final['world_size']} "
               f"run={out}")


def add_eval_predict(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True, help="model.safetensors, checkpoint or run dir")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, help="JSON file (default RUN/eval-SPLIT.json)")
    p.add_argument("--batch-size", type=int, default=256)
    p = sub.add_parser("predict", help="predict the class of image files")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("images", nargs="+")


def run_eval(args) -> None:
    from shardtrain.inference import eval_checkpoint

    ckpt = Path(args.checkpoint)
    out = args.out or (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval-{args.split}.json"
    r = eval_checkpoint(args.checkpoint, args.data, args.split, out, args.batch_size)
    print_main(f"{args.split}: acc={r['acc']:.4f} top5={r['top5']:.4f} loss={r['loss']:.4f} "
               f"samples={r['samples']}")
    worst = sorted(r["per_class_acc"].items(), key=lambda kv: kv[1])[:3]
    print_main("lowest per-class accuracy: " + ", ".join(f"{c} {a:.3f}" for c, a in worst))
    print_main(f"wrote {out} and {out.with_suffix('.png')}")


def run_predict(args) -> None:
    from shardtrain.inference import predict_images

    failed = 0
    for r in predict_images(args.checkpoint, args.images, args.topk):
        if "error" in r:
            failed += 1
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}: " + ", ".join(f"{c} ({p:.3f})" for c, p in r["predictions"]))
    if failed:
        sys.exit(1)


def add_small(sub) -> None:
    p = sub.add_parser("info", help="summarise a shard folder's index.json")
    p.add_argument("dir")
    p = sub.add_parser("verify", help="re-hash every shard and decode every sample")
    p.add_argument("dir")
    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("models", help="list the registered models")


def run_small(args) -> None:
    if args.command == "info":
        from shardtrain.data.inspect import info_text

        print(info_text(args.dir))
    elif args.command == "verify":
        from shardtrain.data.inspect import verify_shards

        print(verify_shards(args.dir))
    elif args.command == "recipes":
        from shardtrain.config import list_recipes

        print("\n".join(list_recipes()))
    elif args.command == "models":
        from shardtrain.models import list_models

        print("\n".join(list_models()))


def add_compare_sweep(sub) -> None:
    p = sub.add_parser("compare", help="table (+ PNG) of runs: differing config, final metrics")
    p.add_argument("runs", nargs="*", type=Path, help="run folders (written by `train`)")
    p.add_argument("--png", type=Path, default=Path("compare.png"),
                   help="val-curve plot of the run folders (default ./compare.png)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="compare W&B runs instead (online)")
    p.add_argument("--group", help="with --wandb: only this group (e.g. a sweep name)")
    p = sub.add_parser("sweep", help="train every point of a grid, then compare them")
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


def run_compare(args) -> None:
    from shardtrain.compare import compare_runs, compare_wandb

    if args.wandb:
        print(compare_wandb(args.wandb, args.group))
        return
    print(compare_runs(args.runs, args.png))
    print(f"wrote {args.png}")


def run_sweep(args) -> None:
    from shardtrain.sweep import list_sweeps, make_sweep, run_sweep

    if args.list:
        print("\n".join(list_sweeps()))
        return
    if not args.data:
        raise UserError("sweep needs --data DIR")
    sweep = make_sweep(args.recipe, args.grid, args.grid_file, args.name)
    print(run_sweep(sweep, args.data, args.out, args.overrides, slurm=args.slurm))


def add_tools(sub) -> None:
    p = sub.add_parser("show", help="PNG grid of samples with labels (--augmented: as trained)")
    p.add_argument("dir")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=64, help="number of samples (tiles)")
    p.add_argument("--augmented", action="store_true", help="apply the recipe's augmentation")
    p.add_argument("--recipe", default=None, help="recipe for --augmented (name or YAML)")
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="recipe override (repeatable), e.g. --set augment.random_erasing=0.5")
    p = sub.add_parser("lr-find", help="learning-rate range test: suggested max lr + PNG")
    p.add_argument("--recipe", required=True)
    p.add_argument("--data", help="shard folder (sets data.path)")
    p.add_argument("--start", type=float, default=1e-6)
    p.add_argument("--end", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path, help="PNG (default runs/lr-find-RECIPE.png; + .json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p = sub.add_parser("export", help="standalone ONNX / TorchScript file (normalisation inside)")
    p.add_argument("--checkpoint", required=True, help="model.safetensors, checkpoint or run dir")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", type=Path, help="default CKPT_DIR/model.onnx or model.pt")


def run_tools(args) -> None:
    if args.command == "show":
        from shardtrain.show import show_samples

        png, tiles = show_samples(args.dir, args.out, args.split, args.n, args.augmented,
                                  args.recipe, args.set)
        print(f"wrote {png} ({tiles} samples)")
    elif args.command == "lr-find":
        from shardtrain.config import load_config
        from shardtrain.lr_find import lr_find

        overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
        cfg = load_config(args.recipe, overrides)
        out = args.out or Path("runs") / f"lr-find-{Path(cfg.recipe).stem}.png"
        r = lr_find(cfg, out, args.start, args.end, args.steps)
        print_main(f"suggested max lr: {r['suggested_lr']:.3g} (steepest descent "
                   f"{r['steepest_lr'] or float('nan'):.3g}, min-loss lr / 10 "
                   f"{r['min_div10_lr']:.3g}; {r['steps_run']} steps) -> {out}")
    elif args.command == "export":
        from shardtrain.export import export_model

        print(f"wrote {export_model(args.checkpoint, args.format, args.out)}")


def print_main(message: str) -> None:
    """Print once per job, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_pack, add_train, add_eval_predict, add_small, add_compare_sweep, add_tools):
        add(sub)
    return parser


COMMANDS = {"pack": run_pack, "train": run_train, "eval": run_eval, "predict": run_predict,
            "compare": run_compare, "sweep": run_sweep, "show": run_tools, "lr-find": run_tools,
            "export": run_tools}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS.get(args.command, run_small)(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"shardtrain: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
