"""Loader throughput: shardtrain's shard loader vs torchvision ImageFolder + DataLoader.

Same images, same augmentation, same number of workers, same batch size, no model:
  - shardtrain: data.loader.make_train_loader (workers decode and draw crop/flip parameters)
    + batch.prepare_batch on CPU (batched pad-crop, flip, normalise, channels_last), as loop.py;
  - torchvision: ImageFolder over the images written as files, per-sample PIL
    RandomCrop(pad, reflect) + RandomHorizontalFlip + ToTensor + Normalize, DataLoader collate.
Data sets: FashionMNIST 28x28 (shards packed as npy and as png; ImageFolder of PNGs) and a
generated Fruits-360-sized set (3,000 smooth random 100x100 JPEGs, 10 classes).
Rates are steady-state images/s, timed from the first batch on (worker start-up excluded: the
train loader is created once per run), interleaved A, B, A, B... and reported as medians.
Also: shard-loader workers 1 vs 2, and peak RSS (main process + workers) for 10k vs 60k samples.

    .venv/bin/python bench/loader.py [--quick]
Writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import DATA, FASHION_MNIST, RESULTS, PeakMemory, ensure_packed, interleaved, machine
from common import median, plan_for, save_json
from PIL import Image

from shardtrain.data.batch import BatchOptions, prepare_batch
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import SampleOptions, make_train_loader

BATCH = 256


# ---- data sets ------------------------------------------------------------------------------
def read_idx_images(limit: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(f"{FASHION_MNIST}/train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(f"{FASHION_MNIST}/train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x[:limit], y[:limit]


def write_folder(root: Path, images, labels, ext: str, **save_kw) -> Path:
    """images as root/train/<class>/<i>.<ext> (an ImageFolder and a shardtrain pack source)."""
    if (root / "done").exists():
        return root
    for c in np.unique(labels):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i, (img, c) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / "train" / f"c{c}" / f"{i:06d}.{ext}", **save_kw)
    (root / "done").touch()
    return root


def fruits_like(n: int, size: int = 100, classes: int = 10, seed: int = 0):
    """Smooth random RGB images: low-resolution noise upsampled, tinted by class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    tints = rng.uniform(0.3, 1.0, (classes, 3))
    images = []
    for c in labels:
        low = rng.uniform(0, 255, (6, 6, 3)) * tints[c]
        img = Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC)
        images.append(np.asarray(img))
    return images, labels


# ---- the two loaders ------------------------------------------------------------------------
def shard_rate(data: Path, pad: int, workers: int, batches: int) -> float:
    index = load_index(data)
    table = sample_table(index, "train")
    plan = plan_for(index, BATCH)
    size = index.image_size[0]
    options = SampleOptions(channels=index.channels, image_size=size, train=True, seed=0,
                            pad_crop=pad, hflip=True)
    opts = BatchOptions(torch.tensor(index.mean), torch.tensor(index.std), "standardize", pad,
                        channels_last=True)
    loader = make_train_loader(table, plan, options, start_micro=0, end_micro=batches + 1,
                               workers=workers, prefetch=4, pin_memory=False)
    return timed(loader, lambda b: prepare_batch(b, torch.device("cpu"), opts, train=True)[0])


def torchvision_rate(root: Path, size: int, pad: int, channels: int, workers: int,
                     batches: int) -> float:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(size, padding=pad, padding_mode="reflect"),
                    T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([0.5] * channels, [0.25] * channels)])
    mode = "L" if channels == 1 else "RGB"
    ds = torchvision.datasets.ImageFolder(
        root / "train", transform=tf, loader=lambda p: Image.open(p).convert(mode))
    loader = torch.utils.data.DataLoader(ds, BATCH, shuffle=True, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    return timed(loader, lambda b: b[0], limit=batches + 1)


def timed(loader, finish, limit: int | None = None) -> float:
    """Steady-state images/s: the clock starts when the first batch has arrived."""
    n, t0 = 0, None
    for i, batch in enumerate(loader):
        x = finish(batch)
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(x)
        if limit and i + 1 >= limit:
            break
    return n / (time.perf_counter() - t0)


def peak_memory(data: Path, pad: int, workers: int, batches: int) -> dict:
    """Peak RSS and PSS (MB) of this process + its loader workers over `batches` batches."""
    import os

    with PeakMemory(os.getpid()) as peak:
        shard_rate(data, pad, workers, batches)
    return peak.result()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n_fm = 10_000 if args.quick else 60_000
    rounds = 1 if args.quick else 3
    batches = 10 if args.quick else 40  # per measurement (10,240 images)
    w = args.workers
    out = {"machine": machine(), "batch": BATCH, "workers": w, "rounds": rounds,
           "batches_per_measurement": batches}

    # FashionMNIST 28x28, pad-crop 2 + flip (the fashion-mnist-resnet9 recipe)
    x, y = read_idx_images(n_fm)
    png_dir = write_folder(DATA / f"fm-png-files-{n_fm}", x, y, "png")
    fm_npy = ensure_packed(f"fm-npy-{n_fm}", "npy", str(png_dir))
    fm_png = ensure_packed(f"fm-png-{n_fm}", "png", str(png_dir))
    rates = interleaved({
        "shard_npy": lambda: shard_rate(fm_npy, 2, w, batches),
        "shard_png": lambda: shard_rate(fm_png, 2, w, batches),
        "imagefolder_png": lambda: torchvision_rate(png_dir, 28, 2, 1, w, batches),
        "shard_npy_1worker": lambda: shard_rate(fm_npy, 2, 1, batches),
    }, rounds)
    out["fashion_mnist_28"] = summarize(rates, "imagefolder_png", n_fm)

    # Fruits-360-sized: 3,000 generated 100x100 JPEGs, pad-crop 8 + flip (fruits360 recipe)
    images, labels = fruits_like(1_000 if args.quick else 3_000)
    jpg_dir = write_folder(DATA / f"fruits-jpg-files-{len(images)}", images, labels, "jpg",
                           quality=90)
    fruits = ensure_packed(f"fruits-shards-{len(images)}", "auto", str(jpg_dir))
    fb = min(batches, len(images) // BATCH - 1)
    rates = interleaved({
        "shard_jpg": lambda: shard_rate(fruits, 8, w, fb),
        "imagefolder_jpg": lambda: torchvision_rate(jpg_dir, 100, 8, 3, w, fb),
    }, rounds)
    out["fruits_100_jpg"] = summarize(rates, "imagefolder_jpg", len(images))

    # memory: the same number of batches read from a 10k and a 60k sample set
    small = ensure_packed("fm-npy-idx-10k", "npy", limit=10_000)
    big = ensure_packed("fm-npy", "npy")
    mem_batches = 39  # one full epoch of the 10k set
    out["peak_memory_mb"] = {
        f"{len(sample_table(load_index(d), 'train').label)}_samples":
            peak_memory(d, 2, w, mem_batches) for d in (small, big)}
    print(f"peak memory, MB (main + {w} workers, {mem_batches} batches): "
          f"{out['peak_memory_mb']}")
    save_json(RESULTS / ("loader-quick.json" if args.quick else "loader.json"), out)


def summarize(rates: dict, baseline: str, n: int) -> dict:
    meds = {k: median(v) for k, v in rates.items()}
    res = {"samples": n, "images_per_sec": {k: round(v) for k, v in meds.items()},
           "all_rates": {k: [round(r) for r in v] for k, v in rates.items()},
           "ratio_vs_" + baseline: {k: round(v / meds[baseline], 2) for k, v in meds.items()
                                    if k != baseline}}
    for k, v in meds.items():
        ratio = "" if k == baseline else f"  ({v / meds[baseline]:.2f}x {baseline})"
        print(f"{k:>20}: {v:8.0f} img/s{ratio}")
    return res


if __name__ == "__main__":
    sys.exit(main())
