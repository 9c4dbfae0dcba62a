"""Exact distributed evaluation: every sample counted once, one collective at the end.

Rank r evaluates samples r, r+world, ... (plan.eval_ids) on the unwrapped model, so no DDP
forward and no per-batch collective (ranks may hold one sample more or less than each other:
a per-batch collective would hang). Sums are all-reduced once, confusion matrix included.

BatchNorm running statistics drift apart across ranks during DDP training (each rank updates
them from its own micro-batches); sync_bn_stats() averages them before eval and before saving,
so every rank evaluates and saves the same model.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object

from shardtrain.data.batch import BatchOptions, prepare_batch


@torch.no_grad()
def sync_bn_stats(model: torch.nn.Module, accelerator) -> None:
    """Average BN running mean/var across ranks (no-op on one process)."""
    if accelerator.num_processes == 1:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                buf.copy_(accelerator.reduce(buf.clone(), reduction="mean"))


def sum_over_ranks(count: int, accelerator) -> int:
    """An integer summed over all ranks (a collective: every rank calls it)."""
    t = torch.tensor([count], dtype=torch.long, device=accelerator.device)
    return int(accelerator.reduce(t, reduction="sum").item())


def sum_per_node(count: int, node: int, nodes: int, accelerator) -> list[int]:
    """An integer summed over the ranks of each node: [node 0, node 1, ...] (a collective)."""
    t = torch.zeros(nodes, dtype=torch.long, device=accelerator.device)
    t[node] = count
    return [int(v) for v in accelerator.reduce(t, reduction="sum").tolist()]


def state_digest(state_dict: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order.

    Bitwise: a permutation of the same values, -0.0 against 0.0, a differing integer buffer (BN
    num_batches_tracked) or another dtype all change it. One host copy of the weights per call.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy())  # the bytes (bf16 has no numpy dtype)
    return digest.hexdigest()


@torch.no_grad()
def ranks_identical(state_dict: dict, accelerator) -> bool:
    """Whether every rank holds bitwise the same tensors (weights, buffers, EMA): one sha256 per
    rank, gathered (a collective: every rank calls it)."""
    if accelerator.num_processes == 1:
        return True
    return len(set(gather_object([state_digest(state_dict)]))) == 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, opts: BatchOptions,
             num_classes: int, transform=None) -> dict:
    """Accuracy, top-5, mean loss, sample count and confusion matrix of one split, all ranks.

    `transform(model, x) -> logits` replaces the plain forward (e.g. test-time augmentation).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top1, top5, count, skipped
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    k = min(5, num_classes)
    for batch in loader:
        sums[4] += len(batch["skipped"])  # corrupt samples: reported, never silently dropped
        if len(batch["labels"]) == 0:
            continue
        x, y = prepare_batch(batch, device, opts, train=False)
        with accelerator.autocast():
            logits = transform(model, x) if transform else model(x)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices  # (B, k)
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (topk[:, 0] == y).sum()
        sums[2] += (topk == y[:, None]).any(dim=1).sum()
        sums[3] += len(y)
        confusion.index_put_((y, topk[:, 0]), torch.ones_like(y, dtype=torch.float64),
                             accumulate=True)
    # note: the only collective of the whole evaluation (and a CPU-GPU sync point)
    total = accelerator.reduce(torch.cat([sums, confusion.flatten()]), reduction="sum").cpu()
    model.train(was_training)
    return summarize(total[:5], total[5:].view(num_classes, num_classes))


def summarize(sums: torch.Tensor, confusion: torch.Tensor) -> dict:
    count = int(sums[3])
    per_class = confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)
    return {
        "acc": float(sums[1] / max(count, 1)),
        "top5": float(sums[2] / max(count, 1)),
        "loss": float(sums[0] / max(count, 1)),
        "samples": count,
        "skipped": int(sums[4]),
        "per_class_acc": [round(float(a), 6) for a in per_class],
        "confusion": confusion.long().tolist(),
    }
