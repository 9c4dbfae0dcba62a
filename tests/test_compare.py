"""compare.py on two synthetic run folders."""

import json

import pytest
import yaml
from PIL import Image

from shardtrain.tracking import compare

from shardtrain.tracking.compare import compare_runs
from shardtrain.errors import UserError


def write_run(run_dir, max_lr, epochs_acc, test_acc, data_path):
    run_dir.mkdir(parents=True)
    config = {"recipe": "fashion-mnist-resnet9",
              "data": {"path": data_path, "batch_size": 128},
              "optim": {"name": "adam", "max_lr": max_lr, "weight_decay": 1e-4},
              "train": {"epochs": len(epochs_acc), "seed": 0},
              "log": {"name": run_dir.name, "wandb": False}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for epoch, acc in enumerate(epochs_acc, start=1):
        lines.append({"kind": "step", "step": epoch * 10, "epoch": float(epoch), "train/loss": 1.0,
                      "train/lr": max_lr, "train/images_per_sec": 1000.0, "train/grad_norm": 1.0})
        lines.append({"kind": "epoch", "step": epoch * 10, "epoch": epoch, "val/loss": 1 - acc,
                      "val/acc": acc, "val/top5": 1.0, "train/epoch_loss": 1.1 - acc})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    final = {"val_acc": epochs_acc[-1], "val_loss": 1 - epochs_acc[-1], "val_top5": 1.0,
             "val_samples": 100, "test_acc": test_acc, "test_loss": 0.3, "test_top5": 1.0,
             "test_samples": 100, "best_val_acc": max(epochs_acc), "epochs": len(epochs_acc),
             "steps": 10 * len(epochs_acc), "world_size": 1, "train_seconds": 12.5,
             "images_per_second": 1000.0, "wandb_run_id": "", "run_dir": str(run_dir)}
    (run_dir / "final.json").write_text(json.dumps(final))
    return run_dir


def test_compare_two_runs(tmp_path, monkeypatch):
    drawn = []
    real_save = compare.save
    monkeypatch.setattr(compare, "save",
                        lambda fig, out, **kw: drawn.append(fig) or real_save(fig, out, **kw))
    a = write_run(tmp_path / "lr-0.01", 0.01, [0.80, 0.85, 0.90], 0.9012, "/data/a")
    b = write_run(tmp_path / "lr-0.02", 0.02, [0.82, 0.91, 0.89], 0.8876, "/data/b")
    table = compare_runs([a, b], tmp_path / "cmp.png")
    print(table)
    header, rule, row_a, row_b = table.splitlines()
    assert header.split() == ["run", "optim.max_lr", "best_val_acc", "val_acc", "test_acc",
                              "steps", "train_seconds"]
    assert set(rule) <= {"-", " "}
    assert row_a.split() == ["lr-0.01", "0.01", "0.9", "0.9", "0.9012", "30", "12.5"]
    assert row_b.split() == ["lr-0.02", "0.02", "0.91", "0.89", "0.8876", "30", "12.5"]
    with Image.open(tmp_path / "cmp.png") as image:
        assert image.format == "PNG" and image.width >= 600
    acc, loss = ({line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                  for line in ax.get_lines()} for ax in drawn[0].axes)
    assert acc == {"lr-0.01": ([1, 2, 3], [0.80, 0.85, 0.90]),  # val acc per epoch, each run
                   "lr-0.02": ([1, 2, 3], [0.82, 0.91, 0.89])}
    assert loss["lr-0.02"][1] == pytest.approx([0.18, 0.09, 0.11])  # val loss (1 - acc here)


def test_compare_rejects_non_run_folder(tmp_path):
    a = write_run(tmp_path / "a", 0.01, [0.8], 0.8, "/d")
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="not a finished run folder.*final.json"):
        compare_runs([a, tmp_path / "junk"], None)


def test_sweeps_show_unfinished_runs_with_their_curves(tmp_path):
    a = write_run(tmp_path / "lr-0.01", 0.01, [0.80, 0.85], 0.9, "/d")
    b = write_run(tmp_path / "lr-10", 10.0, [0.10], 0.1, "/d")
    (b / "final.json").unlink()  # e.g. stopped by a non-finite loss after epoch 1
    with pytest.raises(UserError, match="final.json"):
        compare_runs([a, b])
    table = compare_runs([a, b], tmp_path / "cmp.png", "sweep lr", unfinished=True)
    rows = table.splitlines()[2:]
    assert rows[1].split() == ["lr-10", "(unfinished)", "10", "1", "-", "-", "-", "-", "-"]
    assert (tmp_path / "cmp.png").is_file()
