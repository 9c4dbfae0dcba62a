"""Mixup and CutMix of a whole micro-batch on the training device, with soft targets.

    rng = mix_rng(seed, step, first_sample_id)
    x, targets = mix_batch(x, y, num_classes, rng, mixup_alpha=0.2, cutmix_alpha=1.0,
                           mix_prob=1.0, switch_prob=0.5)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(model(x), targets)  # targets (B, K), rows sum 1

As in timm's `Mixup` (mode="batch"): one coefficient lam ~ Beta(alpha, alpha) per batch, sample
i is mixed with sample B-1-i (the batch reversed). CutMix pastes a box of area ~(1-lam) and then
sets lam to the exact pasted-area ratio after clipping. Label smoothing composes through the
loss: CrossEntropyLoss smooths probability targets as (1-eps)*t + eps/K.

The few scalar draws come from a `random.Random` seeded by (seed, step, first sample id), never
the global RNG (torch has no Beta sampler that takes a Generator; torchvision.transforms.v2.MixUp
and CutMix use the global RNG), so a resumed run mixes exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def mix_rng(seed: int, step: int, first_id: int) -> random.Random:
    """The generator of one micro-batch: differs per step, micro-batch and rank."""
    return random.Random(f"mix:{seed}:{step}:{first_id}")


def cutmix_box(rng: random.Random, height: int, width: int, lam: float) -> tuple[int, ...]:
    """(top, bottom, left, right) of a box of area ~(1 - lam), centre uniform, clipped."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, height)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, width)
    return top, bottom, left, right


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, rng: random.Random, *,
              mixup_alpha: float, cutmix_alpha: float, mix_prob: float = 1.0,
              switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images (B, C, H, W), soft targets (B, num_classes)); x is not modified in place.

    Unmixed batches (prob 1 - mix_prob, or both alphas 0) get one-hot targets.
    """
    targets = F.one_hot(y, num_classes).to(torch.float32)  # (B, K)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= mix_prob:
        return x, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < switch_prob)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = rng.betavariate(alpha, alpha)
    partner = x.flip(0)  # sample i mixes with sample B-1-i
    if cutmix:
        H, W = x.shape[-2:]
        top, bottom, left, right = cutmix_box(rng, H, W, lam)
        x = x.clone()
        x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (H * W)  # the exact kept-area ratio
    else:
        x = x * lam + partner * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam)


def mix_for_step(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, augment, *, seed: int,
                 step: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mix_batch with the `augment` config section and the micro-batch's own rng."""
    a = augment
    rng = mix_rng(seed, step, int(ids[0]) if len(ids) else -1)
    return mix_batch(x, y, num_classes, rng, mixup_alpha=a.mixup_alpha,
                     cutmix_alpha=a.cutmix_alpha, mix_prob=a.mix_prob, switch_prob=a.switch_prob)
