"""Packing speed: `shardtrain pack` (write_shards) vs a plain tarfile writer of the same members.

Source: FashionMNIST IDX (/usr/share/datasets/fashion-mnist, 70k images). Both sides start from
the raw source and end with the shards on disk:
  - shardtrain: write_shards(fmt=npy|png) with its defaults (encoder pool of os.cpu_count()
    processes, 1000 samples per shard, sha256 of every shard, per-sample offsets sidecar,
    class counts and mean/std, index.json);
  - tar: one process, the same val carve-out and order, each sample encoded the same way
    (np.save / PIL PNG) and written with tarfile as `{key}.npy|png` + `{key}.cls`, 1000 per tar.
npy on the full set, png on a 5k+5k subset (PNG encoding dominates). Interleaved, medians.

    .venv/bin/python bench/pack.py [--quick]
Writes bench/results/pack.json.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import FASHION_MNIST, RESULTS, interleaved, machine, median, save_json
from PIL import Image

from shardtrain.data.pack import plan_splits, write_shards
from shardtrain.data.sources import open_source


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 1e6


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, arr, allow_pickle=False)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def plain_tar(out: Path, fmt: str, limit: int) -> int:
    """Naive writer: same items and order as write_shards, tarfile, no extras. Returns count."""
    src = open_source(FASHION_MNIST)
    splits = plan_splits(src.splits, limit, 0.1, 0)
    n = 0
    for split, items in splits.items():
        for start in range(0, len(items), 1000):
            with tarfile.open(out / f"{split}-{start // 1000:06d}.tar", "w") as tar:
                for i, item in enumerate(items[start:start + 1000], start):
                    for name, data in ((f"{i:08d}.{fmt}", encode(item.array, fmt)),
                                       (f"{i:08d}.cls", str(item.label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    n += 1
    return n


def measure(kind: str, fmt: str, limit: int, log: dict) -> float:
    """One run into a fresh temporary folder; records images/s and MB/s, returns images/s."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-pack-{kind}-"))
    try:
        t0 = time.perf_counter()
        if kind == "shardtrain":
            index = write_shards(FASHION_MNIST, out, fmt=fmt, limit=limit, progress=False,
                                 overwrite=True)
            n = sum(s["num_samples"] for s in index["splits"].values())
        else:
            n = plain_tar(out, fmt, limit)
        dt = time.perf_counter() - t0
        log.setdefault(kind, []).append({"images_per_sec": n / dt, "mb_per_sec":
                                         folder_mb(out) / dt, "seconds": dt, "images": n,
                                         "mb": folder_mb(out)})
        return n / dt
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 1 if args.quick else 3
    res = {"machine": machine(), "rounds": rounds}
    for fmt, limit in (("npy", 10_000 if args.quick else 0), ("png", 2_000 if args.quick
                                                              else 5_000)):
        log: dict = {}
        rates = interleaved({k: (lambda k=k, f=fmt, n=limit, g=log: measure(k, f, n, g))
                             for k in ("shardtrain", "tar")}, rounds)
        meds = {k: {m: round(median([r[m] for r in log[k]]), 1)
                    for m in ("images_per_sec", "mb_per_sec", "seconds", "mb")} for k in log}
        ratio = median(rates["shardtrain"]) / median(rates["tar"])
        res[fmt] = {"limit": limit, "images": log["tar"][0]["images"], "median": meds,
                    "ratio_shardtrain_vs_tar": round(ratio, 2)}
        for k, m in meds.items():
            print(f"{fmt} {k:>10}: {m['images_per_sec']:8.0f} img/s {m['mb_per_sec']:6.1f} MB/s "
                  f"({m['mb']:.0f} MB in {m['seconds']:.1f} s)")
        print(f"{fmt}: shardtrain / tar = {ratio:.2f}x")
    save_json(RESULTS / ("pack-quick.json" if args.quick else "pack.json"), res)


if __name__ == "__main__":
    sys.exit(main())
