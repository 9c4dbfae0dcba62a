"""End-of-training media for W&B: a prediction grid, the confusion matrix and the LR schedule.

Called from Loop.finish on the main process only, after the distributed evaluation:

    if reporter.wandb_on:  # main process only; a local forward, no collective
        reporter.log_media(state.step, final_media(loop, total_steps, test or val))

The prediction grid is one forward of the unwrapped model on the first `n` samples of the test
split (val without one), read with a single-process eval loader: cheap and rank-local, so no rank
waits on a collective that only rank 0 runs. Each item is also written as a PNG under RUN/plots/.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shardtrain.data.batch import prepare_batch
from shardtrain.config import OptimConfig
from shardtrain.data.loader import eval_options, make_eval_loader
from shardtrain.optim import lr_factor
from shardtrain.tracking.plots import new_figure, plot_confusion, prediction_grid, save, series
from shardtrain.tracking.report import read_metrics


@torch.no_grad()
def sample_predictions(model: torch.nn.Module, table, data, device,
                       n: int = 16) -> tuple[torch.Tensor, list[int], list[int]]:
    """(uint8 images (n, C, H, W), true labels, predicted labels) of a split's first n samples."""
    options = eval_options(data.index.channels, data.image_size)
    loader = make_eval_loader(table, options, world_size=1, rank=0, batch_size=n, workers=0,
                              pin_memory=False)
    batch = next(iter(loader))
    x, y = prepare_batch(batch, device, data.batch_opts, train=False)
    was_training = model.training
    model.eval()
    pred = model(x).argmax(dim=1)
    model.train(was_training)
    return batch["images"], y.cpu().tolist(), pred.cpu().tolist()


def plot_lr_schedule(optim: OptimConfig, total_steps: int, out_png: Path,
                     records: list[dict] = ()) -> Path:
    """max_lr * optim.lr_factor(step) for every optimizer step of the run; for
    optim.schedule=plateau (it depends on the val losses) the lr logged in metrics.jsonl."""
    o = optim
    if o.schedule == "plateau":
        steps, lrs = series(list(records), "step", "step", "train/lr")
    else:
        steps = list(range(total_steps))
        lrs = [o.max_lr * lr_factor(s, total_steps, o.schedule, o.warmup_frac, o.div_factor,
                                    o.final_div_factor) for s in steps]
    fig, (ax,) = new_figure(6, 4)
    ax.plot(steps, lrs)
    ax.set(title=f"LR schedule ({o.schedule}, max_lr {o.max_lr:g})", xlabel="optimizer step",
           ylabel="learning rate")
    return save(fig, out_png)


def final_media(loop, total_steps: int, last_eval: dict) -> dict:
    """{"media/predictions", "media/confusion_matrix", "media/lr_schedule"}: wandb.Images."""
    import wandb

    data, cfg, plots = loop.data, loop.cfg, loop.out_dir / "plots"
    classes = data.index.classes
    media = {}
    table = data.test if data.test is not None else data.val
    if table is not None and len(table.label):
        # the run's model (the EMA when on); not loop.eval_model(): it syncs BN, a collective
        ema = getattr(loop, "ema", None)
        model = ema.module if ema is not None else loop.accelerator.unwrap_model(loop.model)
        images, true, pred = sample_predictions(model, table, data, loop.accelerator.device)
        grid = prediction_grid(images, true, pred, classes, plots / "predictions.png")
        right = sum(t == p for t, p in zip(true, pred))
        media["media/predictions"] = wandb.Image(
            str(grid), caption=f"predicted (true): {right}/{len(true)} right")
    if last_eval.get("confusion"):
        png = plot_confusion(last_eval["confusion"], classes, plots / "confusion.png")
        media["media/confusion_matrix"] = wandb.Image(str(png), caption="rows true, cols predicted")
    png = plot_lr_schedule(cfg.optim, total_steps, plots / "lr_schedule.png",
                           read_metrics(loop.out_dir / "metrics.jsonl"))
    media["media/lr_schedule"] = wandb.Image(str(png), caption="learning rate per optimizer step")
    return media
