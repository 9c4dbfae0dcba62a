"""`shardtrain show`, `lr-find`, `export` and the fashion-mnist-resnet9-plus recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import read_json, run_shardtrain
from shardtrain.tools.lr_find import SMOOTHING, lr_at, smooth_losses, suggest_lr

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "shards" / "fashion-mnist-12k"


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


def test_suggestion_is_the_steepest_descent_within_the_swept_range():
    steps = 100
    lrs = [lr_at(k, 1e-5, 1.0, steps) for k in range(steps)]
    x = np.log10(lrs)
    # loss falls fastest around lr = 1e-2.5, bottoms out near 1e-1.5 and then explodes
    loss = 2.0 - np.tanh((x + 2.5) * 2) + np.where(x > -1.5, (x + 1.5) * 20, 0)
    r = suggest_lr(lrs, list(loss), 1e-5)
    assert 1e-5 <= r["suggested_lr"] <= 1.0
    assert r["suggested_lr"] == r["steepest_lr"]
    assert 10**-3.0 < r["steepest_lr"] < 10**-2.0
    assert r["min_div10_lr"] == pytest.approx(r["min_loss_lr"] / 10)
    short = suggest_lr(lrs[:3], [1.0, 0.9, 5.0], 1e-5)  # too short for a slope: min / 10
    assert short["steepest_lr"] is None and short["suggested_lr"] == short["min_div10_lr"]


# ---- lr-find: real runs -------------------------------------------------------------------
def test_lr_find_tiny_run_stops_on_divergence_and_suggests_within_range(learnable_shards,
                                                                        tiny_recipe, tmp_path):
    out = tmp_path / "lr.png"
    result = run_shardtrain(["lr-find", "--recipe", tiny_recipe, "--data", learnable_shards,
                             "--start", "1e-4", "--end", "1e3", "--steps", "40", "--out", out,
                             "optim.clip_value=0"])
    r = read_json(out.with_suffix(".json"))
    assert out.is_file() and "suggested max lr" in result.stdout
    assert 1e-4 <= r["suggested_lr"] <= 1e3
    assert len(r["lrs"]) == len(r["losses"]) == r["steps_run"] <= 40
    assert all(b > a for a, b in zip(r["lrs"], r["lrs"][1:]))


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


# ---- the plus recipe ----------------------------------------------------------------------
def test_plus_recipe_trains_on_the_default_data(tmp_path):
    out = tmp_path / "plus"
    run_shardtrain(["train", "--recipe", "fashion-mnist-resnet9-plus", "--data", DEFAULT_DATA,
                    "--out", out, "train.max_steps=10", "model.widths=[8,8,16,16]",
                    "data.batch_size=64", "log.wandb=false", "log.plots=false"], timeout=400)
    final = read_json(out / "final.json")
    assert final["steps"] == 10
    for key in ("test_acc", "test_acc_raw", "test_acc_tta", "val_acc_tta"):
        assert math.isfinite(final[key]) and 0 <= final[key] <= 1, key


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
