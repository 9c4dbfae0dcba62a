"""Test-time augmentation (`train.tta`): average the softmax over flipped/translated views.

    logits = tta_logits(model, x, "flip")   # x: normalised (B, C, H, W); returns log-probs
    evaluate(model, loader, accelerator, opts, num_classes, transform=make_tta("flip"))

Views: flip = {x, hflip(x)}; flip_translate adds each of those shifted by (+2, +2) and (-2, -2)
px (reflect padding), 6 views in all, as in hlb-CIFAR10's TTA. The result is the log of the
mean softmax, a valid logit vector (softmax(log p) = p), so accuracy, top-5 and cross-entropy
in evaluate() work unchanged. A horizontally symmetric model gets exactly its plain output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

TRANSLATE_PX = 2


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift (B, C, H, W) by (dy, dx) px with reflect padding; shape kept."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    H, W = x.shape[-2:]
    return padded[..., p - dy:p - dy + H, p - dx:p - dx + W]


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    if mode not in ("flip", "flip_translate"):
        raise ValueError(f"unknown tta {mode!r}; choose from none, flip, flip_translate")
    views = [x, x.flip(-1)]
    if mode == "flip_translate":
        s = TRANSLATE_PX
        views += [translate(v, d, d) for v in views[:2] for d in (s, -s)]
    return views


def tta_logits(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """log(mean over views of softmax(model(view))), (B, num_classes) float32."""
    probs = torch.stack([model(v).float().softmax(dim=1) for v in tta_views(x, mode)])
    return probs.mean(dim=0).clamp_min(1e-12).log()


def make_tta(mode: str):
    """The `transform(model, x) -> logits` argument of evaluate(), or None for mode none."""
    return None if mode == "none" else functools.partial(tta_logits, mode=mode)
