"""`shardtrain COMMAND ...`: parse the command line, then call one function.

    shardtrain pack SOURCE OUT_DIR [--shard-size N --val-fraction F --limit N --workers N ...]
    shardtrain info DIR | verify DIR
    shardtrain train --recipe NAME|PATH --data DIR [--out RUN_DIR] [--resume auto|PATH] [k=v ...]
    shardtrain eval --checkpoint CKPT --data DIR [--split test]
    shardtrain predict --checkpoint CKPT IMAGE...
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
    p.add_argument("source", help="image folder, CIFAR batches folder, IDX folder or torchvision:NAME")
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
        from shardtrain.data.index import info_text

        print(info_text(args.dir))
    elif args.command == "verify":
        from shardtrain.data.index import verify_shards

        print(verify_shards(args.dir))
    elif args.command == "recipes":
        from shardtrain.config import list_recipes

        print("\n".join(list_recipes()))
    elif args.command == "models":
        from shardtrain.models import list_models

        print("\n".join(list_models()))


def print_main(message: str) -> None:
    """Print once per job, not once per process."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_pack, add_train, add_eval_predict, add_small):
        add(sub)
    return parser


COMMANDS = {"pack": run_pack, "train": run_train, "eval": run_eval, "predict": run_predict}


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
