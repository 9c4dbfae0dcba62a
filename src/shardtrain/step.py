"""What the optimizer-step loop keeps and uses besides the Loop itself.

    State            where training is (saved in every checkpoint; loop.py mutates it)
    Clock            training seconds, stopped around evaluation and checkpoint writing
    plain_module()   the model inside its DDP and torch.compile wrappers
    clip_gradients() AMP-safe clipping: unscale once, measure, clip by value, clip by norm
    StepLoss         the losses of an optimizer step, kept on the device

Used by loop.py, train.py and tools/lr_find.py.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch


@dataclass
class State:
    """Where training is: everything the loop mutates, saved in every checkpoint.

    The skipped_* counts are this rank's; a checkpoint stores their sums over all ranks and
    a resume gives them back to rank 0 (train.restore), so they are counted once."""

    step: int = 0  # optimizer steps done (also the data position: see data/plan.py)
    best_val_acc: float = -1.0
    wandb_id: str = field(default_factory=lambda: secrets.token_hex(4))
    skipped_samples: int = 0  # corrupt samples dropped from their batch
    skipped_examples: list = field(default_factory=list)  # the first 20 of them
    skipped_micro_batches: int = 0  # micro-batches with < 2 readable samples (no gradient)
    train_seconds: float = 0.0  # optimizer steps only: not evaluation, not checkpoint writing
    images_seen: int = 0
    last_val: dict = field(default_factory=dict)
    fp16_skipped_steps: int = 0  # optimizer steps the fp16 grad scaler skipped (inf/nan grads)
    downloaded_bytes: list = field(default_factory=list)  # per epoch: bytes per node (URLs)


class Clock:
    """Training time: stopped around evaluation and checkpoint writing, read at log steps."""

    def __init__(self, step: int):
        self.start: float | None = time.perf_counter()
        self.seconds = 0.0  # training seconds since the last lap
        self.step = step  # optimizer step of the last lap

    def stop(self, state: State) -> None:
        if self.start is not None:
            elapsed = time.perf_counter() - self.start
            state.train_seconds += elapsed
            self.seconds += elapsed
            self.start = None

    def restart(self) -> None:
        self.start = time.perf_counter()

    def lap(self, state: State) -> tuple[int, float]:
        """(optimizer steps, training seconds) since the last lap."""
        self.stop(state)
        steps, seconds = state.step - self.step, self.seconds
        self.step, self.seconds = state.step, 0.0
        self.restart()
        return steps, seconds


def plain_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP and torch.compile wrappers (the same parameters): what is
    evaluated, averaged (EMA) and saved, so weights files have plain keys, loadable anywhere.

    accelerate's unwrap_model keeps compile's `_orig_mod.` prefix by default, and keeps the
    compiled module when it sits inside DDP (as ours does) whatever it is asked."""
    module = accelerator.unwrap_model(model, keep_torch_compile=False)
    return getattr(module, "_orig_mod", module)


def clip_gradients(accelerator, parameters, clip_value: float, clip_norm: float,
                   measure: bool = False, before_clipping=None) -> torch.Tensor | None:
    """Unscale once, measure the gradient norm (before any clipping), clip by value, by norm.

    Once: under fp16, GradScaler.unscale_ refuses a second call before update(), and
    accelerator.clip_grad_value_ and clip_grad_norm_ each call it. Returns the norm when
    `measure` (clip_grad_norm_ with max_norm=inf multiplies by exactly 1; clipping by norm
    alone, clip_grad_norm_ measures it, returning the norm before clipping), else None.
    `before_clipping()`, when given, runs on the unscaled gradients before any clipping."""
    accelerator.unscale_gradients()  # a no-op without a grad scaler
    if before_clipping is not None:
        before_clipping()
    params = [p for p in parameters if p.grad is not None]
    if clip_norm and not clip_value:
        norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        return norm if measure else None
    norm = torch.nn.utils.clip_grad_norm_(params, float("inf")) if measure else None
    if clip_value:
        torch.nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    return norm


class StepLoss:
    """This rank's micro-batch losses of the current optimizer step, the (sum, count) of the
    last finished step and the first step whose loss was not finite (-1: none), all kept on
    the device: nothing here is a CPU-GPU sync point."""

    def __init__(self, device: torch.device):
        self.micro: list[torch.Tensor] = []
        self.last = (torch.zeros((), device=device), 0)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.micro.append(loss.detach())

    def end_step(self, step: int, track_finite: bool = True) -> None:
        total = torch.stack(self.micro).sum() if self.micro else torch.zeros_like(self.last[0])
        self.last, self.micro = (total, len(self.micro)), []
        if track_finite:
            bad = (self.first_bad_step < 0) & ~torch.isfinite(total)
            now = torch.full_like(self.first_bad_step, step)
            self.first_bad_step = torch.where(bad, now, self.first_bad_step)
