"""End-of-training media for W&B: predictions (grid + table), the confusion matrix (PNG +
interactive chart) and the LR schedule.

Called from Loop.finish on the main process only, after the distributed evaluation:

    if reporter.wandb_on:  # main process only; a local forward, no collective
        reporter.log_media(state.step, final_media(loop, total_steps, test or val))

The prediction grid and table come from one forward of the unwrapped model on the first
max(16, log.predictions) samples of the test split (val without one), read with a single-process
eval loader: cheap and rank-local, so no rank waits on a collective that only rank 0 runs. The
confusion chart uses the exact all-ranks confusion matrix of the last evaluation. The images are
also written as PNGs under RUN/plots/.
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

GRID = 16  # samples in the prediction grid PNG


@torch.no_grad()
def sample_predictions(model: torch.nn.Module, table, data, device,
                       n: int = 16) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
    """(uint8 images (n, C, H, W), true labels, softmax (n, K), sample ids) of a split's first
    n samples."""
    options = eval_options(data.index.channels, data.image_size)
    loader = make_eval_loader(table, options, world_size=1, rank=0, batch_size=n, workers=0,
                              pin_memory=False)
    batch = next(iter(loader))
    x, y = prepare_batch(batch, device, data.batch_opts, train=False)
    was_training = model.training
    model.eval()
    probs = model(x).float().softmax(dim=1).cpu()
    model.train(was_training)
    return batch["images"], y.cpu().tolist(), probs, batch["ids"].tolist()


def predictions_table(images: torch.Tensor, true: list[int], probs: torch.Tensor, ids: list[int],
                      classes: list[str]):
    """wandb.Table: sample, image, true class, predicted class, confidence, correct."""
    import wandb

    confidence, pred = probs.max(dim=1)
    table = wandb.Table(columns=["sample", "image", "true", "predicted", "confidence", "correct"])
    for i in range(len(true)):
        image = images[i].permute(1, 2, 0).numpy()  # (H, W, C) uint8
        table.add_data(ids[i], wandb.Image(image[:, :, 0] if image.shape[2] == 1 else image),
                       classes[true[i]], classes[int(pred[i])], round(float(confidence[i]), 4),
                       int(pred[i]) == true[i])
    return table


def confusion_chart(confusion: list[list[float]], classes: list[str], title: str):
    """wandb.plot.confusion_matrix (interactive) of an exact, all-ranks confusion matrix: the
    counts are expanded into the (true, predicted) pairs that function takes."""
    import wandb

    y_true, preds = [], []
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            y_true += [i] * int(count)
            preds += [j] * int(count)
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=classes,
                                       title=title)


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
    """wandb.Images "media/predictions" (grid), "media/confusion_matrix", "media/lr_schedule";
    a wandb.Table "media/prediction_table" (log.predictions rows) and the interactive
    "media/confusion_chart" (its table is logged as "media/confusion_chart_table")."""
    import wandb

    data, cfg, plots = loop.data, loop.cfg, loop.out_dir / "plots"
    classes = data.index.classes
    media = {}
    table = data.test if data.test is not None else data.val
    split = "test" if data.test is not None else "val"
    if table is not None and len(table.label):
        # the run's model (the EMA when on); not loop.eval_model(): it syncs BN, a collective
        ema = getattr(loop, "ema", None)
        model = ema.module if ema is not None else loop.plain
        images, true, probs, ids = sample_predictions(
            model, table, data, loop.accelerator.device, max(GRID, cfg.log.predictions))
        pred = probs.argmax(dim=1).tolist()
        grid = prediction_grid(images[:GRID], true[:GRID], pred[:GRID], classes,
                               plots / "predictions.png")
        right = sum(t == p for t, p in zip(true[:GRID], pred[:GRID]))
        media["media/predictions"] = wandb.Image(
            str(grid), caption=f"predicted (true): {right}/{len(true[:GRID])} right")
        if cfg.log.predictions:
            n = cfg.log.predictions
            media["media/prediction_table"] = predictions_table(
                images[:n], true[:n], probs[:n], ids[:n], classes)
    if last_eval.get("confusion"):
        png = plots / "confusion.png"
        if not cfg.log.plots:  # else report.write_eval_files drew it, from this same matrix
            plot_confusion(last_eval["confusion"], classes, png)
        media["media/confusion_matrix"] = wandb.Image(str(png), caption="rows true, cols predicted")
        media["media/confusion_chart"] = confusion_chart(
            last_eval["confusion"], classes, f"Confusion matrix ({split})")
    png = plot_lr_schedule(cfg.optim, total_steps, plots / "lr_schedule.png",
                           read_metrics(loop.out_dir / "metrics.jsonl"))
    media["media/lr_schedule"] = wandb.Image(str(png), caption="learning rate per optimizer step")
    if (plots / "weights.png").is_file():  # written by report.write_eval_files (log.plots)
        media["media/weights"] = wandb.Image(str(plots / "weights.png"),
                                             caption="weights per layer at the end")
    return media
