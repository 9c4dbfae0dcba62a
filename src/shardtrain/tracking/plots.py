"""Matplotlib helpers (Agg backend, files only): training curves, confusion matrix, prediction grid.

    plot_curves(records_from_metrics_jsonl, run_dir / "plots")  # accuracy.png, loss.png, lr.png

Figures are built with the object API (`Figure` + Agg canvas), so nothing touches pyplot's global
figure registry or rcParams and the functions are safe inside a training process.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float, cols: int = 1):
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, cols, i + 1) for i in range(cols)]
    return fig, axes


def save(fig: Figure, out_png: Path, rect=(0, 0, 1, 1)) -> Path:
    """Lay the panels out inside `rect` (figure fractions) and write the PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(out_png)
    return out_png


def series(records: list[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    rows = [r for r in records if r.get("kind") == kind and r.get(y) is not None]
    return [r[x] for r in rows], [r[y] for r in rows]


def plot_curves(metrics_records: list[dict], out_dir: Path) -> list[Path]:
    """metrics.jsonl records -> accuracy.png (val acc/epoch), loss.png, lr.png (LR/step)."""
    out_dir, written = Path(out_dir), []
    panels = [
        ("accuracy.png", "Accuracy vs. epochs", "epoch", "accuracy",
         [("epoch", "epoch", "val/acc", "val acc")]),
        ("loss.png", "Loss vs. epochs", "epoch", "loss",
         [("epoch", "epoch", "train/epoch_loss", "train loss"),
          ("epoch", "epoch", "val/loss", "val loss")]),
        ("lr.png", "Learning rate vs. step", "optimizer step", "learning rate",
         [("step", "step", "train/lr", "lr")]),
    ]
    for filename, title, xlabel, ylabel, lines in panels:
        fig, (ax,) = new_figure(6, 4)
        for kind, x, y, label in lines:
            xs, ys = series(metrics_records, kind, x, y)
            ax.plot(xs, ys, marker="x" if kind == "epoch" else None, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if len(lines) > 1:
            ax.legend()
        written.append(save(fig, out_dir / filename))
    return written


def plot_confusion(matrix: list[list[int]], classes: list[str], out_png: Path) -> Path:
    """Confusion matrix (rows = true class, columns = predicted) with counts in the cells."""
    n = len(classes)
    fig, (ax,) = new_figure(max(4, 0.6 * n + 2), max(4, 0.6 * n + 1.5))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true",
           title="Confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    peak = max((max(row) for row in matrix), default=0)
    if n <= 30:  # counts stay legible up to ~30 classes
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > peak / 2 else "black")
    return save(fig, out_png)


def prediction_grid(images, true: list[int], pred: list[int], classes: list[str],
                    out_png: Path, cols: int = 8) -> Path:
    """Images with "pred (true)" titles, green when right, red when wrong.

    Args:
        images: uint8 tensor or array (N, C, H, W), C = 1 or 3.
    """
    n = len(images)
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.6 * min(n, cols), 1.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        ax = fig.add_subplot(rows, min(n, cols), i + 1)
        image = images[i].detach().cpu().numpy() if hasattr(images[i], "detach") else images[i]
        image = image.transpose(1, 2, 0)  # (H, W, C)
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        right = int(pred[i]) == int(true[i])
        ax.set_title(f"{classes[int(pred[i])]}\n({classes[int(true[i])]})", fontsize=8,
                     color="green" if right else "red")
        ax.axis("off")
    return save(fig, out_png)


def sample_grid(images, labels: list[int], classes: list[str], out_png: Path,
                cols: int = 8) -> tuple[Path, int]:
    """uint8 (N, C, H, W) images titled with their class, `cols` per row -> (png, tiles drawn).

    The figure is 1.6 x 1.8 in (160 x 180 px) per tile, so the PNG is (160 cols) x (180 rows).
    """
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = images[i].detach().cpu().numpy().transpose(1, 2, 0)  # (H, W, C)
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        ax.set_title(classes[int(labels[i])], fontsize=8)
        ax.axis("off")
    return save(fig, out_png), n
