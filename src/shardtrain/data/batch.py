"""prepare_batch(): move a loader batch to the training device and finish it there.

Workers send uint8 images (4x less to copy than float) plus per-sample crop/flip/jitter
parameters; the pad-crop, flips, colour jitter, normalisation and memory-format change run here
as batched tensor ops, on the GPU when there is one. Copies are non_blocking from pinned memory
(the loader pins on CUDA).
Progressive resizing (augment.progressive_sizes): the loader tags each training batch with the
side of its epoch (batch["size"]); a smaller side is a batched antialiased bilinear resize here,
after normalisation, so early epochs cost (size / image_size)^2 of the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardtrain.data import transforms


CPU_CHUNK = 8  # images per normalisation pass on CPU


@dataclass(frozen=True)
class BatchOptions:
    mean: torch.Tensor  # (C,) in [0, 1] units
    std: torch.Tensor  # (C,)
    scaling: str  # standardize | unit | none
    pad_crop: int = 0
    channels_last: bool = False


def prepare_batch(batch: dict, device: torch.device, opts: BatchOptions,
                  train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images (B, C, H, W) on device, labels (B,) on device)."""
    x = batch["images"].to(device, non_blocking=True)  # (B, C, H, W) uint8
    y = batch["labels"].to(device, non_blocking=True)
    if train and (opts.pad_crop or batch["hflips"].any() or batch["vflips"].any()):
        x = transforms.crop_flip_batch(
            x, batch["offsets"].to(device, non_blocking=True),
            batch["hflips"].to(device, non_blocking=True),
            batch["vflips"].to(device, non_blocking=True), opts.pad_crop)
    jitter = batch["jitter"].to(device, non_blocking=True) if train and "jitter" in batch else None
    # on CPU a few images per pass stay in cache; on a GPU one pass over the batch
    chunk = CPU_CHUNK if device.type == "cpu" else 0
    x = transforms.normalize(x, opts.mean.to(device), opts.std.to(device), opts.scaling,
                             channels_last=opts.channels_last, jitter=jitter, chunk=chunk)
    size = batch.get("size", x.shape[-1])
    if train and size != x.shape[-1]:  # progressive resizing: this epoch trains at size px
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
    if opts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y
