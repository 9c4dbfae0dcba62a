"""`shardtrain show`, `lr-find` and `export` (the plus recipe's real run: test_slow.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import RUNS, read_json, run_shardtrain
from shardtrain.tools.lr_find import SMOOTHING, lr_at, smooth_losses, suggest_lr

pytestmark = RUNS  # lr-find, export and show run as real subprocesses


# ---- show ---------------------------------------------------------------------------------
@pytest.mark.parametrize("augmented", [False, True])
def test_show_writes_a_grid_with_the_requested_number_of_tiles(learnable_shards, tiny_recipe,
                                                               tmp_path, augmented):
    from shardtrain.tools.show import show_samples

    out = tmp_path / "grid.png"
    png, tiles = show_samples(str(learnable_shards), out, "train", 12, augmented,
                              str(tiny_recipe) if augmented else None,
                              ["augment.random_erasing=0.5"] if augmented else [])
    assert png == out and tiles == 12
    with Image.open(out) as image:  # 160 x 180 px per tile, 8 per row: 8 x 2 tiles
        assert image.size == (8 * 160, 2 * 180)


@pytest.fixture
def grid_calls(monkeypatch):
    """What `show` hands to the grid renderer: (uint8 images (N, C, H, W), labels)."""
    from shardtrain.tools import show

    calls = []

    def capture(images, labels, classes, out_png, cols=8):
        calls.append((images.clone(), list(labels)))
        return Path(out_png), len(images)

    monkeypatch.setattr(show, "sample_grid", capture)
    return calls


def test_show_draws_the_stored_samples_with_their_labels(learnable_shards, tmp_path,
                                                         grid_calls):
    from shardtrain.data.codec import decode_image
    from shardtrain.data.index import ShardReader, load_index, sample_table
    from shardtrain.tools.show import show_samples

    table = sample_table(load_index(learnable_shards), "val")
    reader = ShardReader(table.shard_paths)
    stored = torch.stack([decode_image(reader.read(int(table.shard[i]), int(table.offset[i]),
                                                   int(table.size[i])), str(table.ext[i]), 3)
                          for i in range(len(table))])
    show_samples(str(learnable_shards), tmp_path / "v.png", "val", 100)
    ((images, labels),) = grid_calls
    assert torch.equal(images, stored) and labels == table.label.tolist()


def test_show_augmented_is_the_training_augmentation_of_each_sample(
        learnable_shards, tiny_recipe, tmp_path, grid_calls):
    """Every tile equals what epoch 0 of `shardtrain train` feeds the model for that sample
    (per-sample stage in the loader, then the batch pad-crop/flip), before normalisation."""
    from accelerate import Accelerator

    from shardtrain.config import load_config
    from shardtrain.data.batch import BatchOptions, prepare_batch
    from shardtrain.data.loader import make_train_loader, train_options
    from shardtrain.tools.show import show_samples
    from shardtrain.train import setup_data

    overrides = ["augment.random_erasing=0.5"]
    show_samples(str(learnable_shards), tmp_path / "p.png", "train", 192)
    show_samples(str(learnable_shards), tmp_path / "a.png", "train", 192, True, str(tiny_recipe),
                 overrides)
    (plain, labels), (augmented, aug_labels) = grid_calls
    assert labels == aug_labels and augmented.shape == plain.shape == (192, 3, 16, 16)
    changed = (augmented != plain).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.8  # pad-crop 2, flips, erasing: nearly every tile
    cfg = load_config(str(tiny_recipe), overrides + [f"data.path={learnable_shards}"])
    d = setup_data(cfg, Accelerator(cpu=True))
    options = train_options(cfg.augment, cfg.train.seed, d.index.channels, d.image_size)
    opts = BatchOptions(torch.zeros(3), torch.ones(3), "none", cfg.augment.pad_crop)
    for batch in make_train_loader(d.train, d.plan, options, start_micro=0, end_micro=3,
                                   workers=0, prefetch=2, pin_memory=False):
        x, _ = prepare_batch(batch, torch.device("cpu"), opts, train=True)
        trained = x.round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(augmented[batch["ids"]], trained)


def test_show_cli(learnable_shards, tmp_path):
    result = run_shardtrain(["show", learnable_shards, "--split", "val", "--n", "5",
                             "--out", tmp_path / "v.png"])
    assert "(5 samples)" in result.stdout
    with Image.open(tmp_path / "v.png") as image:
        assert image.size == (5 * 160, 180)


# ---- lr-find: pure functions --------------------------------------------------------------
def test_smoothing_is_bias_corrected_and_monotone_on_a_decreasing_loss():
    steps = 200
    lrs = [lr_at(k, 1e-6, 1.0, steps) for k in range(steps)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert smooth_losses([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no bias to 0
    rng = np.random.default_rng(0)
    # synthetic: a descending loss with small noise, smoothed over a ~10-step window
    loss = list(2.3 - np.linspace(0, 1.5, steps) + rng.normal(0, 0.01, steps))
    smoothed = smooth_losses(loss)
    window = round(1 / (1 - SMOOTHING))
    for i in range(window, steps):
        assert smoothed[i] <= smoothed[i - window] + 1e-9  # monotone across each window
    clean = smooth_losses(list(2.3 - np.linspace(0, 1.5, steps)))
    assert all(b <= a + 1e-12 for a, b in zip(clean, clean[1:]))  # strictly decreasing input


def test_suggestion_is_the_steepest_descent_not_the_minimum():
    steps = 100
    lrs = [lr_at(k, 1e-6, 1.0, steps) for k in range(steps)]
    x = np.log10(lrs)
    # loss falls fastest at lr = 1e-4, keeps falling slowly to its minimum at 1e-1, then explodes
    loss = 2.0 - np.tanh((x + 4) * 2) - 0.05 * (x + 4) + np.where(x > -1, (x + 1) * 20, 0)
    r = suggest_lr(lrs, list(loss), 1e-6)
    assert r["suggested_lr"] == r["steepest_lr"]
    # the bracket holds the steepest descent and nothing the other heuristics would give:
    # the minimum (1e-1), the minimum / 10 (1e-2), the start of the search (1e-5.4)
    assert 10**-4.2 < r["steepest_lr"] < 10**-3.8
    assert 10**-1.1 < r["min_loss_lr"] < 10**-0.9
    assert r["min_div10_lr"] == pytest.approx(r["min_loss_lr"] / 10)
    short = suggest_lr(lrs[:3], [1.0, 0.9, 5.0], 1e-5)  # too short for a slope: min / 10
    assert short["steepest_lr"] is None and short["suggested_lr"] == short["min_div10_lr"]
    assert short["min_div10_lr"] == 1e-5  # min-loss lr / 10 = 1.2e-7, clamped to the start


# ---- lr-find: real runs -------------------------------------------------------------------
def first_stop(losses: list[float], factor: float = 4.0) -> int:
    """Index of the step the range test must stop after: first non-finite raw loss or smoothed
    loss above `factor` x its running minimum (the smoothed minimum includes this step)."""
    smoothed = smooth_losses(losses)
    for i, (raw, s) in enumerate(zip(losses, smoothed)):
        if not math.isfinite(raw) or s > factor * min(smoothed[:i + 1]):
            return i
    return len(losses) - 1


def test_lr_find_tiny_run_stops_on_divergence_and_suggests_below_the_minimum(
        learnable_shards, tiny_recipe, tmp_path):
    out = tmp_path / "lr.png"
    result = run_shardtrain(["lr-find", "--recipe", tiny_recipe, "--data", learnable_shards,
                             "--start", "1e-4", "--end", "1e3", "--steps", "40", "--out", out,
                             "optim.clip_value=0"])
    r = read_json(out.with_suffix(".json"))
    assert out.is_file() and "suggested max lr" in result.stdout
    lrs, losses = r["lrs"], r["losses"]
    assert len(lrs) == len(losses) == r["steps_run"]
    assert lrs == pytest.approx([lr_at(k, 1e-4, 1e3, 40) for k in range(len(lrs))], rel=1e-12)
    # Adam at lr ~ 1e3 diverges: the test stopped exactly at the first step its rule fired
    assert r["stopped_early"] is True and r["steps_run"] < 40
    assert first_stop(losses) == len(losses) - 1
    assert r["smoothed"] == pytest.approx(smooth_losses(losses), rel=1e-12)
    # the suggestion is the steepest descent of that curve, well below the loss minimum
    assert r["suggested_lr"] == r["steepest_lr"] == suggest_lr(lrs, r["smoothed"], 1e-4)[
        "steepest_lr"]
    assert lrs[len(lrs) // 10] <= r["suggested_lr"] <= r["min_loss_lr"] / 10


def test_lr_find_on_two_processes_prints_one_suggestion(learnable_shards, tiny_recipe,
                                                        tmp_path):
    out = tmp_path / "lr2.png"
    result = run_shardtrain(["lr-find", "--recipe", tiny_recipe, "--data", learnable_shards,
                             "--steps", "6", "--out", out], nproc=2)
    assert result.stdout.count("suggested max lr") == 1
    assert read_json(out.with_suffix(".json"))["steps_run"] == 6


# ---- export -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "train.max_steps=4", "log.plots=false"])
    return out


def reference(run: Path, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from shardtrain.tools.inference import batch_options, load_model
    from shardtrain.data.transforms import normalize

    model, meta = load_model(str(run))
    opts = batch_options(meta)
    with torch.no_grad():
        return model(normalize(images, opts.mean, opts.std, opts.scaling)), meta


def test_torchscript_export_matches_the_model_and_carries_class_names(trained, tmp_path):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    expected, meta = reference(trained, images)
    result = run_shardtrain(["export", "--checkpoint", trained, "--format", "torchscript",
                             "--out", tmp_path / "m.pt"])
    assert "m.pt" in result.stdout
    extra = {"classes.json": ""}
    scripted = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == meta["classes"]
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scripted(images.float()), expected, atol=1e-4, rtol=1e-4)
        assert scripted(images[:2]).shape == (2, len(meta["classes"]))


def test_onnx_export_matches_the_model_and_carries_class_names(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install "
                                                    "'shardtrain[onnx]')")
    onnx = pytest.importorskip("onnx", reason="onnx not installed")
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    expected, meta = reference(trained, images)
    out = tmp_path / "m.onnx"
    run_shardtrain(["export", "--checkpoint", trained, "--format", "onnx", "--out", out])
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == meta["classes"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy().astype(np.float32)})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)


# ---- a trained transfer model stands alone ------------------------------------------------
def test_trained_transfer_model_loads_without_its_pretrained_backbone_file(learnable_shards,
                                                                          tiny_recipe,
                                                                          tmp_path):
    """The weights file holds the whole trained network: once trained, eval/predict/export
    must not read the pretrained backbone again (it may be gone, or the machine offline)."""
    import torchvision

    backbone = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), backbone)
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "model.name=transfer", "model.backbone=resnet18", "model.head_hidden=8",
                    f"model.pretrained={backbone}", "train.max_steps=2", "log.plots=false"])
    backbone.unlink()
    assert "test: acc=" in run_shardtrain(["eval", "--checkpoint", out, "--data",
                                           learnable_shards]).stdout
    image = next((learnable_shards.parent / "src" / "test" / "red").glob("*.png"))
    assert run_shardtrain(["predict", "--checkpoint", out, image]).stdout.startswith(f"{image}: ")
    run_shardtrain(["export", "--checkpoint", out, "--format", "torchscript"])
    assert (out / "model.pt").is_file()
