"""plots.py: every helper draws the data it is given (read back from the figure) into a PNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from shardtrain.tracking import plots
from shardtrain.tracking.plots import plot_confusion, plot_curves, prediction_grid


def metrics_records(epochs: int = 3, steps_per_epoch: int = 4) -> list[dict]:
    records = []
    for epoch in range(1, epochs + 1):
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i + 1
            records.append({"kind": "step", "step": step, "epoch": step / steps_per_epoch,
                            "train/loss": 2.0 / step, "train/lr": 0.001 * step,
                            "train/images_per_sec": 900.0, "train/grad_norm": 1.0})
        records.append({"kind": "epoch", "step": epoch * steps_per_epoch, "epoch": epoch,
                        "val/loss": 1.0 / epoch, "val/acc": 0.5 + 0.1 * epoch, "val/top5": 1.0,
                        "train/epoch_loss": 1.2 / epoch})
    return records


@pytest.fixture
def figures(monkeypatch):
    """Every Figure plots.save() writes, keyed by file name (the PNG is still written)."""
    saved = {}
    real_save = plots.save

    def keep(fig, out_png):
        path = real_save(fig, out_png)
        saved[path.name] = fig
        return path

    monkeypatch.setattr(plots, "save", keep)
    return saved


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()  # a complete, valid PNG
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def lines_of(fig) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[0].get_lines()}


def test_plot_curves_draw_the_metrics(tmp_path, figures):
    records = metrics_records()
    paths = plot_curves(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "loss.png", "lr.png"]
    assert all(png_size(p) == (600, 400) for p in paths)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert lines_of(figures["lr.png"]) == {
        "lr": ([r["step"] for r in steps], [r["train/lr"] for r in steps])}
    assert lines_of(figures["accuracy.png"]) == {
        "val acc": ([1, 2, 3], [r["val/acc"] for r in epochs])}
    assert lines_of(figures["loss.png"]) == {
        "train loss": ([1, 2, 3], [r["train/epoch_loss"] for r in epochs]),
        "val loss": ([1, 2, 3], [r["val/loss"] for r in epochs])}
    assert figures["lr.png"].axes[0].get_xlabel() == "optimizer step"


def test_plot_confusion_draws_the_counts(tmp_path, figures):
    matrix = [[5, 1, 0], [2, 7, 1], [0, 0, 9]]
    out = plot_confusion(matrix, ["a", "b", "c"], tmp_path / "cm.png")
    assert out.is_file() and png_size(out)[0] >= 400
    ax = figures["cm.png"].axes[0]
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), matrix)
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
             for t in ax.texts}
    assert cells == {(i, j): str(matrix[i][j]) for i in range(3) for j in range(3)}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_prediction_grid_shows_each_image_with_pred_and_true(tmp_path, figures):
    gen = torch.Generator().manual_seed(0)
    classes = ["cat", "dog"]
    true, pred = [0, 1] * 5, [0, 0] * 5
    for channels in (1, 3):
        images = torch.randint(0, 256, (10, channels, 16, 16), dtype=torch.uint8, generator=gen)
        out = prediction_grid(images, true, pred, classes, tmp_path / f"grid{channels}.png")
        assert png_size(out) == (8 * 160, 2 * 180)
        axes = figures[out.name].axes
        assert len(axes) == 10
        for i, ax in enumerate(axes):
            shown = np.asarray(ax.get_images()[0].get_array())
            expected = images[i].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(shown, expected[:, :, 0] if channels == 1 else expected)
            title = ax.title
            assert title.get_text() == f"{classes[pred[i]]}\n({classes[true[i]]})"
            assert title.get_color() == ("green" if pred[i] == true[i] else "red")
