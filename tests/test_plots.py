"""plots.py: every helper writes a real PNG."""

import torch

from shardtrain.tracking.plots import plot_confusion, plot_curves, prediction_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_plot_curves(tmp_path):
    paths = plot_curves(metrics_records(), tmp_path / "plots")
    assert [p.name for p in paths] == ["accuracy.png", "loss.png", "lr.png"]
    assert all(is_png(p) for p in paths)


def test_plot_confusion(tmp_path):
    out = plot_confusion([[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["a", "b", "c"], tmp_path / "cm.png")
    assert is_png(out)


def test_prediction_grid(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        images = torch.randint(0, 256, (10, channels, 16, 16), dtype=torch.uint8, generator=gen)
        out = prediction_grid(images, [0, 1] * 5, [0, 0] * 5, ["cat", "dog"],
                              tmp_path / f"grid{channels}.png")
        assert is_png(out)
