"""`shardtrain lr-find`: the learning-rate range test (Smith 2015; fastai's lr_find).

    shardtrain lr-find --recipe fashion-mnist-resnet9 --data shards/fashion-mnist-12k
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ... -m shardtrain \
        lr-find --recipe ... --data ...

Trains the recipe's model from its initial weights on the recipe's data pipeline for up to
`steps` optimizer steps while the lr grows exponentially from `start` to `end` (every param
group gets lr x its lr_mult; the recipe's schedule is not used; clipping is). Each step's loss is
all-reduced over ranks, so every rank sees the same curve, stops at the same step and computes
the same suggestion (printed once, plotted by rank 0). The loss is smoothed with a
bias-corrected EMA (beta = SMOOTHING = 0.9, a ~10-step window; fastai's 0.98 averages ~50
steps, which on a 200-step sweep lags the raw loss by about 1.5 decades of lr and pushes both
suggestions too high); the test stops when the smoothed loss exceeds 4x its minimum.

Suggested max lr = the steepest descent of the smoothed loss against log(lr), searched between
10% into the sweep and the minimum of the smoothed loss; when that stretch is shorter than 3
points, min-loss lr / 10 (clamped to `start`). Both candidates are reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from shardtrain.data.batch import prepare_batch
from shardtrain.data.loader import make_train_loader, train_options
from shardtrain.optim import make_optimizer, param_groups
from shardtrain.step import clip_gradients
from shardtrain.train import build_model, make_accelerator, setup_data

SMOOTHING = 0.9  # EMA beta of the loss curve


def lr_at(k: int, start: float, end: float, steps: int) -> float:
    """lr of step k of an exponential sweep from start (k = 0) to end (k = steps - 1)."""
    return start * (end / start) ** (k / max(steps - 1, 1))


def smooth_losses(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected EMA: s_t = m_t / (1 - beta^(t+1)), m_t = beta m_{t-1} + (1-beta) l_t."""
    smoothed, avg = [], 0.0
    for t, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        smoothed.append(avg / (1 - beta ** (t + 1)))
    return smoothed


def suggest_lr(lrs: list[float], smoothed: list[float], start: float) -> dict:
    """{"suggested_lr", "steepest_lr", "min_loss_lr", "min_div10_lr"} (see the module doc)."""
    lowest = int(np.argmin(smoothed))
    min_div10 = max(lrs[lowest] / 10, start)
    first = len(lrs) // 10
    steepest = None
    if lowest - first >= 2:
        slope = np.gradient(np.asarray(smoothed[first:lowest + 1]),
                            np.log(np.asarray(lrs[first:lowest + 1])))
        steepest = lrs[first + int(np.argmin(slope))]
    return {"suggested_lr": steepest if steepest is not None else min_div10,
            "steepest_lr": steepest, "min_loss_lr": lrs[lowest], "min_div10_lr": min_div10}


def lr_find(cfg, out_png: Path, start: float = 1e-6, end: float = 1.0, steps: int = 200,
            stop_factor: float = 4.0) -> dict:
    """Run the range test on all ranks; rank 0 writes out_png and out_png.json."""
    acc = make_accelerator(cfg)
    data = setup_data(cfg, acc)
    set_seed(cfg.train.seed)  # the same initial weights as `shardtrain train`
    model, _ = build_model(cfg, data.index, data.image_size)
    o = cfg.optim
    optimizer = make_optimizer(o.name, param_groups(model, o.weight_decay, o.head_lr_mult),
                               start, o.momentum, o.nesterov, tuple(o.betas))
    model, optimizer = acc.prepare(model, optimizer)
    options = train_options(cfg.augment, cfg.train.seed, data.index.channels, data.image_size)
    loader = make_train_loader(data.train, data.plan, options, start_micro=0,
                               end_micro=steps * cfg.train.grad_accum, workers=cfg.data.workers,
                               prefetch=cfg.data.prefetch, pin_memory=torch.cuda.is_available())
    lrs, losses = sweep(cfg, acc, data, model, optimizer, loader, (start, end, steps),
                        stop_factor)
    smoothed = smooth_losses(losses)
    result = {**suggest_lr(lrs, smoothed, start), "steps_run": len(lrs),
              "stopped_early": len(lrs) < steps, "lrs": lrs, "losses": losses,
              "smoothed": smoothed, "plot": str(out_png)}
    if acc.is_main_process:
        plot_lr_find(result, out_png)
        Path(out_png).with_suffix(".json").write_text(json.dumps(result, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def sweep(cfg, acc, data, model, optimizer, loader, sweep_range, stop_factor):
    """The few lines of the training step, with the lr set per step; (lrs, all-ranks losses)."""
    start, end, steps = sweep_range
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    lrs, losses, best = [], [], math.inf
    model.train()
    for micro, batch in enumerate(loader):
        lr = lr_at(micro // cfg.train.grad_accum, start, end, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        x, y = prepare_batch(batch, acc.device, data.batch_opts, train=True)
        with acc.accumulate(model):
            loss = criterion(model(x), y)
            acc.backward(loss)
            if acc.sync_gradients:  # unscales fp16 gradients once, however many clippings
                clip_gradients(acc, model.parameters(), cfg.optim.clip_value, cfg.optim.clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        # note: a CPU-GPU sync point and an all-reduce every step: the test needs each loss
        value = float(acc.reduce(loss.detach().float(), reduction="mean").item())
        lrs.append(lr)
        losses.append(value)
        smoothed = smooth_losses(losses)[-1]
        best = min(best, smoothed)
        if not math.isfinite(value) or smoothed > stop_factor * best:
            break  # identical on every rank: the loss was all-reduced
    return lrs, losses


def plot_lr_find(result: dict, out_png: Path) -> Path:
    """Raw and smoothed loss against lr (log x), the suggestion marked."""
    from shardtrain.tracking.plots import new_figure, save

    fig, (ax,) = new_figure(6, 4)
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed loss")
    ax.axvline(result["suggested_lr"], color="red", linestyle="--",
               label=f"suggested max lr {result['suggested_lr']:.2g}")
    top = min(max(result["smoothed"]), 4 * min(result["smoothed"]))
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title="Learning-rate range test", ylim=(None, top * 1.05))
    ax.legend()
    return save(fig, out_png)
