"""Exponential moving average (EMA) of a model's weights and buffers (`train.ema_decay > 0`).

    ema = EMA(model, decay=0.999, warmup=10)   # a copy of the (unwrapped) model
    ...; optimizer.step(); ema.update(accelerator.unwrap_model(model))   # every optimizer step
    evaluate(ema.module, ...); save_weights(path, ema.module.state_dict(), meta)

Built on torch.optim.swa_utils.AveragedModel with use_buffers=True, so BatchNorm running
statistics are averaged like the weights (the EMA model needs no BN re-estimation). Update n
(n = 1, 2, ... after the first update, which copies the model) uses
    decay_n = min(decay, (1 + n) / (warmup + n))  if warmup > 0, else decay
i.e. warmup=10 is the `(1 + step) / (10 + step)` ramp of TensorFlow's ExponentialMovingAverage
(num_updates), which keeps early EMA weights from being dominated by the random init.
Integer buffers (BN num_batches_tracked) are copied, not averaged.

DDP: update from the unwrapped model after each optimizer step. Weights are identical on every
rank after the step; BN buffers are not (each rank updates them from its own micro-batches), so
the trainer averages the EMA's BN buffers across ranks (evaluate.sync_bn_stats) wherever it
averages the model's. Since EMA is linear that equals the EMA of the rank-averaged buffers.
Checkpoints store the EMA tensors in the model state dict under the `ema.` prefix (state_dict /
split_ema), so resuming continues the same average.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from shardtrain.errors import UserError

PREFIX = "ema."


def ema_decay_at(n: int, decay: float, warmup: int) -> float:
    """Decay used by update number n (n >= 1; update 0 copies the model)."""
    return min(decay, (1 + n) / (warmup + n)) if warmup > 0 else decay


class EMA:
    """AveragedModel with a warm-up of the decay; `module` is the averaged copy."""

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0):
        self.decay, self.warmup = decay, warmup
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=True)
        self.averaged.requires_grad_(False)
        self.updates = 0  # Python copy of n_averaged: no CPU-GPU sync to compute the decay

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def _average(self, ema_tensors: list, model_tensors: list, n_averaged) -> None:
        if torch.is_floating_point(ema_tensors[0]):
            decay = ema_decay_at(self.updates, self.decay, self.warmup)
            get_ema_multi_avg_fn(decay)(ema_tensors, model_tensors, n_averaged)
        else:  # BN num_batches_tracked: a count, not something to average
            torch._foreach_copy_(ema_tensors, model_tensors)

    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (unwrapped, not DDP) into the average."""
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict:
        """EMA tensors keyed `ema.<param name>` plus `ema.n_averaged`, for the checkpoint."""
        state = {PREFIX + k: v for k, v in self.module.state_dict().items()}
        state[PREFIX + "n_averaged"] = self.averaged.n_averaged.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict (keys with the `ema.` prefix; others are ignored)."""
        _, ema_state = split_ema(state)
        n_averaged = ema_state.pop("n_averaged")
        self.module.load_state_dict(ema_state)
        self.averaged.n_averaged.copy_(n_averaged)
        self.updates = int(n_averaged)


def split_ema(state: dict) -> tuple[dict, dict]:
    """(model state, EMA state without the prefix) from a checkpoint's model state dict."""
    model_state = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    ema_state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return model_state, ema_state


def make_ema(model: nn.Module, decay: float, warmup: int,
             checkpoint_state: dict | None) -> EMA | None:
    """EMA of the (unwrapped, on-device) model when decay > 0, resumed from a checkpoint's
    model state dict (which holds the EMA tensors under `ema.`)."""
    if decay <= 0:
        return None
    ema = EMA(model, decay, warmup)
    if checkpoint_state is not None:
        if PREFIX + "n_averaged" not in checkpoint_state:
            raise UserError("cannot resume with train.ema_decay > 0: the checkpoint has no EMA "
                            "(it was trained without it)")
        ema.load_state_dict(checkpoint_state)
    return ema
