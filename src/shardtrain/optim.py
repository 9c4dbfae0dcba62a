"""Optimizer, parameter groups and learning-rate schedules.

    groups = param_groups(model, weight_decay=5e-4, head_lr_mult=10.0)
    optimizer = make_optimizer("sgd", groups, lr=0.1)
    scheduler = make_scheduler(optimizer, max_lr=0.1, total_steps=1000, schedule="onecycle",
                               warmup_frac=0.25, div_factor=25, final_div_factor=1e4)
    for step in range(total_steps):
        ...; optimizer.step(); scheduler.step()

The schedule is the pure function `lr_factor(step, ...)` wrapped in LambdaLR, so it can be
plotted and tested without a model. The optimizer step with 0-based index k uses
lr = max_lr * lr_mult * lr_factor(k); a run extended on resume continues the same curve,
stretched (StepSchedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0) -> list[dict]:
    """Groups with decay only on tensors with ndim >= 2; `model.head` params get lr_mult.

    All parameters are included, also frozen ones (they get no grad and are not updated), so
    freezing and unfreezing a backbone does not need a new optimizer. Call on the unwrapped model.
    """
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        is_head = head_lr_mult != 1.0 and id(p) in head_ids
        groups.setdefault((is_head, p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr_mult": head_lr_mult if is_head else 1.0,
        }
        for (is_head, decay), params in sorted(groups.items())
    ]


def make_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """adam (L2 weight decay added to the gradient, as in the tutorials), adamw (decoupled), sgd."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(betas))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; choose from adam, adamw, sgd")


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str,
    warmup_frac: float,
    div_factor: float,
    final_div_factor: float,
) -> float:
    """Multiplier of max_lr for the optimizer step with 0-based index `step`.

    start = 1/div_factor, peak = 1 at step `warm = round(warmup_frac * (total_steps - 1))`,
    end = 1/(div_factor * final_div_factor) at the last step (onecycle and cosine).
    1) constant: linear warm-up from start to 1 over `warm` steps, then 1 forever.
    2) step >= total_steps - 1 (the last step and any step after it): end.
    3) step < warm: rise from start to 1, half-cosine (onecycle, like torch's OneCycleLR
       with anneal_strategy="cos") or linear (cosine).
    4) otherwise: half-cosine from 1 at step `warm` down to end at the last step.
    With warmup_frac = 0 the first step is the peak; with total_steps = 1 it is the end.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if schedule not in ("onecycle", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; choose from onecycle, cosine, constant")
    last = total_steps - 1
    warm = round(warmup_frac * last)
    start = 1.0 / div_factor
    end = start / final_div_factor
    # 1) constant
    if schedule == "constant":
        return start + (1.0 - start) * step / warm if step < warm else 1.0
    # 2) the last step uses the minimum
    if step >= last:
        return end
    # 3) warm-up
    if step < warm:
        t = step / warm
        if schedule == "onecycle":
            return 1.0 + (start - 1.0) * (1.0 + math.cos(math.pi * t)) / 2.0
        return start + (1.0 - start) * t
    # 4) cosine decay; here warm <= step < last, so last - warm >= 1
    t = (step - warm) / (last - warm)
    return end + (1.0 - end) * (1.0 + math.cos(math.pi * t)) / 2.0


@dataclass
class StepSchedule:
    """The LambdaLR lr_lambda: factor of optimizer step k, with the run extensible on resume.

    Its fields are saved in the scheduler's state_dict (LambdaLR saves a callable object's
    __dict__), so a checkpoint knows the schedule it was trained on.
    Extending (or shortening) a run at step s to a new total T: the optimizer step with index
    s keeps the lr it had, and the rest of the planned schedule (positions s..total_steps-1) is
    stretched over the steps s..T-1, so the lr stays continuous and ends at the same minimum.
    `position(k)` is where on the planned schedule step k is.
    """

    total_steps: int  # planned length of the schedule (the run's first total_steps)
    schedule: str
    warmup_frac: float
    div_factor: float
    final_div_factor: float
    anchor_step: int = 0  # from this step on, positions are stretched ...
    anchor_pos: float = 0.0  # ... starting at this position
    end_steps: int = 0  # the run's total_steps now (0: as planned)

    def position(self, step: int) -> float:
        end, last = self.end_steps or self.total_steps, self.total_steps - 1
        if end == self.total_steps and self.anchor_step == 0:
            return step
        if end - 1 <= self.anchor_step:
            return last
        return self.anchor_pos + (step - self.anchor_step) * (last - self.anchor_pos) / (
            end - 1 - self.anchor_step)

    def extend(self, step: int, total_steps: int) -> None:
        """Continue at `step` (the next step index) on a run that is now total_steps long."""
        if total_steps != (self.end_steps or self.total_steps):
            self.anchor_pos, self.anchor_step = self.position(step), step
            self.end_steps = total_steps

    def __call__(self, step: int) -> float:
        return lr_factor(self.position(step), self.total_steps, self.schedule, self.warmup_frac,
                         self.div_factor, self.final_div_factor)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    max_lr: float,
    total_steps: int,
    schedule: str,
    warmup_frac: float,
    div_factor: float,
    final_div_factor: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with base lr max_lr * group["lr_mult"] per group and factor StepSchedule(step).

    Call `scheduler.step()` once after every optimizer step. After loading a checkpoint's
    state into it, `scheduler.lr_lambdas[0].extend(step, total_steps)` continues the run with a
    new length (see StepSchedule).
    """
    for group in optimizer.param_groups:
        group["lr"] = max_lr * group.get("lr_mult", 1.0)
        group["initial_lr"] = group["lr"]  # LambdaLR only setdefault()s it
    factor = StepSchedule(total_steps, schedule, warmup_frac, div_factor, final_div_factor)
    factor(0)  # fail here on a bad schedule name, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over trainable tensors with ndim >= 2 (multiply by optim.l1 in the loss)."""
    weights = [p for p in model.parameters() if p.ndim >= 2 and p.requires_grad]
    if not weights:
        return torch.zeros(())
    return torch.stack([w.abs().sum() for w in weights]).sum()
