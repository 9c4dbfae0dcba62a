"""`optim.schedule=plateau`: a constant learning rate, cut when the validation loss stops improving.

    scheduler = PlateauLR(optimizer, max_lr=0.003, factor=0.5, patience=0, threshold=1e-3,
                          min_lr=1e-5)
    for step in ...:  optimizer.step(); scheduler.step()      # no-op: the lr is constant
    at each evaluation: scheduler.observe(val_loss)          # may multiply the lr by `factor`

The FashionMNIST tutorial's "LR annealing" study (Keras-style ReduceLROnPlateau on val loss,
factor 0.5, patience 0, min_lr 1e-5). Unlike optim.py's schedules this is not a function of the
step (it depends on the losses seen), so it lives apart; torch's ReduceLROnPlateau does the
bookkeeping (best loss, epochs without improvement, threshold in its default relative mode:
a loss counts as better when below best * (1 - threshold)). Every rank observes the same
all-reduced validation loss, so every rank cuts its lr at the same evaluation. The state (best,
counters) goes into checkpoints through state_dict(); the lr itself is in the optimizer's state.
"""

from __future__ import annotations

import torch


class PlateauLR:
    """The Loop's scheduler interface (step, get_last_lr, state_dict) plus observe(val_loss)."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, factor: float = 0.5,
                 patience: int = 0, threshold: float = 1e-3, min_lr: float = 1e-5):
        for group in optimizer.param_groups:  # same base lr per group as optim.make_scheduler
            group["lr"] = max_lr * group.get("lr_mult", 1.0)
            group["initial_lr"] = group["lr"]
        self.optimizer = optimizer
        min_lrs = [min_lr * group.get("lr_mult", 1.0) for group in optimizer.param_groups]
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=factor, patience=patience, threshold=threshold,
            min_lr=min_lrs)

    def step(self) -> None:
        """Called after every optimizer step: the lr only changes at evaluations."""

    def observe(self, val_loss: float) -> None:
        """One evaluation's loss: after more than `patience` evaluations without improvement,
        multiply every group's lr by `factor` (not below min_lr)."""
        self.plateau.step(val_loss)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return self.plateau.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.plateau.load_state_dict(state)
