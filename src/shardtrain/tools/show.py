"""`shardtrain show DIR`: a PNG grid of samples with their class names, plain or augmented.

    shardtrain show shards/fashion-mnist-12k --split train --n 64 --out samples.png
    shardtrain show shards/fashion-mnist-12k --augmented --recipe fashion-mnist-resnet9-plus

Augmented views go through exactly the training path: the loader's per-sample stage
(SampleOptions from the recipe: resized crop, rotation, jitter, policy, random erasing) and then
batch.prepare_batch's pad-crop/flip, with scaling "none" so the result is still 0..255.
Batch-level mixup/cutmix is not shown. The first N samples of the split are drawn (epoch 0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shardtrain.data.batch import BatchOptions, prepare_batch
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import eval_options, make_eval_loader, train_options
from shardtrain.errors import UserError
from shardtrain.tracking.plots import sample_grid


def show_samples(data_dir: str, out_png: Path, split: str = "train", n: int = 64,
                 augmented: bool = False, recipe: str | None = None,
                 overrides: list[str] = (), cols: int = 8) -> tuple[Path, int]:
    """Write the grid; returns (png path, number of tiles)."""
    from shardtrain.config import load_config

    index = load_index(data_dir)
    if split not in index.splits:
        raise UserError(f"no split {split!r} in {data_dir}; it has {', '.join(index.splits)}")
    table = sample_table(index, split)
    cfg = load_config(recipe, list(overrides))
    size = cfg.data.image_size or (max(index.image_size) if index.image_size else 0)
    if not size:
        raise UserError("images in this dataset vary in size: pass data.image_size=N")
    n = max(1, min(n, len(table.label)))
    if augmented:
        options = train_options(cfg.augment, cfg.train.seed, index.channels, size)
    else:
        options = eval_options(index.channels, size)
    loader = make_eval_loader(table, options, world_size=1, rank=0, batch_size=n, workers=0,
                              pin_memory=False)
    batch = next(iter(loader))
    zeros = torch.zeros(index.channels)
    opts = BatchOptions(zeros, zeros + 1, "none", cfg.augment.pad_crop if augmented else 0)
    x, y = prepare_batch(batch, torch.device("cpu"), opts, train=augmented)  # float 0..255
    images = x.round().clamp(0, 255).to(torch.uint8)  # (N, C, H, W)
    return sample_grid(images, y.tolist(), index.classes, out_png, cols)
