"""write_shards(): SOURCE -> OUT_DIR/{split}-{i:06d}.tar[.gz] + .samples.json sidecars + index.json.

Deterministic: inputs are sorted, subset/val/shuffle use random.Random(seed), workers return results
in order, and tar/gzip headers carry no time or owner, so the same input and options give
byte-identical shards. Memory stays flat: items are encoded and written in blocks.

    from shardtrain.data.pack import write_shards
    write_shards("/usr/share/datasets/fashion-mnist", "shards/fm", limit="10000,test=2000",
                 compress=True, fmt="npy")
CLI: `shardtrain pack SOURCE OUT_DIR --limit 10000,test=2000 --compress --format npy`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import random
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shardtrain import __version__
from shardtrain.data.codec import encode_sample
from shardtrain.data.shard_writer import SplitShardWriter
from shardtrain.data.sources import Item, open_source
from shardtrain.errors import UserError

SPLIT_ORDER = ("train", "val", "test")
BLOCK = 2048  # items encoded per pool round: bounds memory whatever the dataset size


def _parse_limit(limit: int | str | dict | None) -> dict[str, int]:
    """0 / 5000 / "5000" / "train=9000,test=2000" / "5000,test=2000" -> {split or "*": n}."""
    if isinstance(limit, dict):
        return {str(k): int(v) for k, v in limit.items()}
    out: dict[str, int] = {}
    try:
        for part in str(limit or 0).split(","):
            name, _, n = part.rpartition("=")
            out[name.strip() or "*"] = int(n)
    except ValueError:
        raise UserError(f"bad --limit {limit!r}: use N or train=N,test=M") from None
    if any(v < 0 for v in out.values()):
        raise UserError(f"bad --limit {limit!r}: must be >= 0")
    return out


def _stratified_pick(items: list[Item], n: int, rng: random.Random) -> tuple[list, list]:
    """Pick n items with per-class shares kept (largest remainder); (picked, rest) keep order."""
    by_cls: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_cls.setdefault(it.label, []).append(i)
    total = len(items)
    quota = {c: n * len(ix) // total for c, ix in by_cls.items()}
    rema = sorted(by_cls, key=lambda c: (-(n * len(by_cls[c]) % total), c))
    for c in rema[: n - sum(quota.values())]:
        quota[c] += 1
    chosen = set()
    for c in sorted(by_cls):
        chosen.update(rng.sample(by_cls[c], quota[c]))
    picked = [it for i, it in enumerate(items) if i in chosen]
    return picked, [it for i, it in enumerate(items) if i not in chosen]


def plan_splits(
    splits: dict[str, list[Item]], limit, val_fraction: float, seed: int
) -> dict[str, list[Item]]:
    """Apply the per-split limit, carve val from train if absent, shuffle each split (seeded)."""
    rng, lim = random.Random(seed), _parse_limit(limit)
    out = {}
    for name in [s for s in SPLIT_ORDER if s in splits]:
        items, n = splits[name], lim.get(name, lim.get("*", 0))
        out[name] = _stratified_pick(items, n, rng)[0] if 0 < n < len(items) else list(items)
    if "val" not in out and val_fraction > 0 and out["train"]:
        n_val = round(len(out["train"]) * val_fraction)
        out["val"], out["train"] = _stratified_pick(out["train"], n_val, rng)
    for name in out:
        rng.shuffle(out[name])
    return {s: out[s] for s in SPLIT_ORDER if out.get(s)}


def _encode_one(item: Item, channels: int, fmt: str, image_size: int, max_size: int) -> tuple:
    """Worker: ("ok", ext, bytes, label, (h, w), sums, sqsums, digest) or ("skip", reason)."""
    try:  # a file is read once, here: a vanishing file is a skip like any unreadable one
        src = item.array if item.array is not None else Path(item.path).read_bytes()
        ext, data, arr = encode_sample(src, channels=channels, fmt=fmt, image_size=image_size,
                                       max_size=max_size)
    except (ValueError, OSError) as e:
        return ("skip", str(e))
    px = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.int64)
    sums = tuple(int(v) for v in px.sum(axis=(0, 1)))
    sqsums = tuple(int(v) for v in (px * px).sum(axis=(0, 1)))
    # duplicate detection key: label + sha256 of the file, one small bytes object per file
    digest = (item.label.to_bytes(4, "little") + hashlib.sha256(src).digest()
              if item.path else None)
    return ("ok", ext, data, item.label, arr.shape[:2], sums, sqsums, digest)


class _Stats:
    """Class counts per split, pixel sums over train (exact ints), image size range."""

    def __init__(self, n_classes: int, channels: int):
        self.counts: dict[str, list[int]] = {}
        self.sums, self.sqsums, self.pixels = [0] * channels, [0] * channels, 0
        self.hw_min, self.hw_max = [1 << 30, 1 << 30], [0, 0]
        self.n_classes = n_classes

    def add(self, split: str, label: int, hw: tuple, sums: tuple, sqsums: tuple) -> None:
        self.counts.setdefault(split, [0] * self.n_classes)[label] += 1
        self.hw_min = [min(a, b) for a, b in zip(self.hw_min, hw, strict=True)]
        self.hw_max = [max(a, b) for a, b in zip(self.hw_max, hw, strict=True)]
        if split == "train":
            self.sums = [a + b for a, b in zip(self.sums, sums, strict=True)]
            self.sqsums = [a + b for a, b in zip(self.sqsums, sqsums, strict=True)]
            self.pixels += hw[0] * hw[1]

    def mean_std(self) -> tuple[list[float], list[float]]:
        n = max(self.pixels, 1)
        mean = [s / n / 255.0 for s in self.sums]
        var = [max(q / n / 65025.0 - m * m, 0.0) for q, m in zip(self.sqsums, mean, strict=True)]
        return [round(m, 6) for m in mean], [round(float(np.sqrt(v)), 6) for v in var]


def _skip(skipped: list, root: str, item: Item, split: str, reason: str, strict: bool) -> None:
    path = os.path.relpath(item.path, root) if item.path else f"<{split} array>"
    if strict:
        raise UserError(f"--strict: {split} sample {path} unusable: {reason}")
    skipped.append({"path": path, "split": split, "reason": reason})


@dataclass
class _Packing:
    """What every split's packing shares: statistics, the skip list, duplicate detection."""

    stats: _Stats
    skipped: list[dict]  # {"path", "split", "reason"} of every unusable input
    bar: tqdm
    src_root: str  # skipped paths are shown relative to it
    strict: bool  # fail on the first unusable input instead of skipping it
    seen: dict = field(default_factory=dict)  # label + sha256 of the file (bytes) -> first path


def _write_split(split: str, items: list[Item], writer: SplitShardWriter, encode,
                 pool, packing: _Packing) -> None:
    """Encode items in ordered blocks and stream them into `writer`."""
    stats, skipped, seen, bar = packing.stats, packing.skipped, packing.seen, packing.bar
    src_root, strict = packing.src_root, packing.strict
    for start in range(0, len(items), BLOCK):
        block = items[start : start + BLOCK]
        chunk = max(1, min(64, len(block) // (4 * (pool._processes if pool else 1))))
        results = pool.imap(encode, block, chunksize=chunk) if pool else map(encode, block)
        for item, res in zip(block, results, strict=True):
            bar.update(1)
            if res[0] == "skip":
                _skip(skipped, src_root, item, split, res[1], strict)
                continue
            _, ext, data, label, hw, sums, sqsums, digest = res
            if digest is not None and digest in seen:
                dup = os.path.relpath(seen[digest], src_root)
                _skip(skipped, src_root, item, split, f"duplicate of {dup}", strict)
                continue
            if digest is not None:
                seen[digest] = item.path
            writer.add(ext, data, label)
            stats.add(split, label, hw, sums, sqsums)
    writer.close()


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} is not empty; choose a new directory or pass --overwrite")
        for p in out_dir.iterdir():
            if p.name == "index.json" or p.name.endswith((".tar", ".tar.gz", ".samples.json")):
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_options(shard_size, val_fraction, fmt, channels, image_size, max_size) -> None:
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if fmt not in ("auto", "npy", "png", "jpg"):
        raise UserError(f"--format must be auto, npy, png or jpg, got {fmt!r}")
    if channels not in (0, 1, 3):
        raise UserError(f"--channels must be 0 (auto), 1 or 3, got {channels}")
    if image_size < 0:
        raise UserError(f"--image-size must be >= 0, got {image_size}")
    if max_size < 0:
        raise UserError(f"--max-size must be >= 0, got {max_size}")


def _summary(index: dict, out_dir: Path) -> str:
    splits = index["splits"]
    shards = [s for sp in splits.values() for s in sp["shards"]]
    total = sum(sp["num_samples"] for sp in splits.values())
    parts = ", ".join(f"{k} {v['num_samples']}" for k, v in splits.items())
    mb = sum(s["bytes"] for s in shards) / 1e6
    return (f"packed {total} samples ({parts}) in {len(shards)} shards, {mb:.1f} MB, "
            f"{index['num_skipped']} skipped -> {out_dir}")  # fmt: skip


def _make_index(out_dir, src, channels, stats, writers, skipped, options) -> dict:
    mean, std = stats.mean_std()
    return {
        "format_version": 1, "name": out_dir.resolve().name, "classes": list(src.classes),
        "channels": channels,
        "image_size": stats.hw_min if stats.hw_min == stats.hw_max else None,
        "image_size_range": {"min": stats.hw_min, "max": stats.hw_max},
        "mean": mean, "std": std,
        "splits": {s: {"num_samples": w.n, "class_counts": stats.counts[s], "shards": w.shards}
                   for s, w in writers.items() if w.n},
        "skipped": skipped, "num_skipped": len(skipped),
        "source": {"kind": src.kind, "path": src.path},
        "pack_options": options,
        "created_by": f"shardtrain {__version__}",
    }  # fmt: skip


def _encoder_pool(n_workers: int):
    """A fork pool whose workers leave the parent's objects alone: gc.freeze() moves everything
    allocated so far (the list of every input file) out of the collector's reach, so the
    workers' collections do not write to those pages and copy them (memory growing with the
    dataset); the Python docs' recipe for fork without exec."""
    if n_workers <= 1:
        return None
    gc.freeze()
    try:
        return multiprocessing.Pool(n_workers)
    finally:
        gc.unfreeze()


def write_shards(
    source: str,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    val_fraction: float = 0.1,
    limit: int | str | dict = 0,
    workers: int = 0,
    seed: int = 0,
    fmt: str = "auto",
    compress: bool = False,
    image_size: int = 0,
    max_size: int = 0,
    channels: int = 0,
    classes: list[str] | None = None,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Pack SOURCE into shards in OUT_DIR and return the index written to index.json.

    Args:
        limit: max samples per split (stratified), 0 = all; "train=N,test=M" sets splits apart.
        workers: encoder processes, 0 = os.cpu_count(), 1 = in this process.
        image_size: resize the shorter side and centre-crop to this square, 0 = keep.
        max_size: without image_size, shrink images whose longer side exceeds this (aspect
            kept, JPEG sources stay JPEG), 0 = keep: as FFCV's max_resolution, it bounds the
            decode cost of large photographs at train time.
        channels: 1 or 3; 0 = the source's own (1 for gray IDX, 3 otherwise).
    """
    _check_options(shard_size, val_fraction, fmt, channels, image_size, max_size)
    out_dir = Path(out_dir)
    src = open_source(str(source), classes)
    channels = channels or src.channels
    splits = plan_splits(src.splits, limit, val_fraction, seed)
    if strict and src.skipped:
        s = src.skipped[0]
        raise UserError(f"--strict: {s['split']} {s['path']} unusable: {s['reason']}")
    _prepare_out_dir(out_dir, overwrite)
    stats, skipped = _Stats(len(src.classes), channels), list(src.skipped)
    encode = partial(_encode_one, channels=channels, fmt=fmt, image_size=image_size,
                     max_size=max_size)
    n_workers = min(workers or os.cpu_count() or 1, max(1, sum(map(len, splits.values())) // 16))
    bar = tqdm(total=sum(map(len, splits.values())), file=sys.stderr, disable=not progress,
               unit="img", desc="pack")  # fmt: skip
    writers = {s: SplitShardWriter(out_dir, s, shard_size, compress) for s in splits}
    packing = _Packing(stats, skipped, bar, src.path, strict)
    pool = _encoder_pool(n_workers)
    try:
        for split, items in splits.items():
            _write_split(split, items, writers[split], encode, pool, packing)
        if not (writers.get("train") and writers["train"].n):
            example = skipped[-1]["reason"] if skipped else "no samples"
            raise UserError(f"nothing usable in {source}: no train sample left ({example})")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    options = {"shard_size": shard_size, "val_fraction": val_fraction, "limit": limit,
               "seed": seed, "format": fmt, "compress": compress, "image_size": image_size,
               "max_size": max_size, "channels": channels}  # fmt: skip
    index = _make_index(out_dir, src, channels, stats, writers, skipped, options)
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    print(_summary(index, out_dir))
    return index
