"""The code paths a GPU run takes, run on CPU: the fp16 grad scaler, bf16 + channels_last,
torch.compile, and how `precision=auto` asks the GPU (tests/emulate.py does the emulating)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import RUNS, read_json, read_jsonl, run_shardtrain
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = RUNS  # real training subprocesses

INIT_SCALE = 2.0**20  # large enough that the first steps overflow in fp16 and are skipped
FP16_STEPS = 8  # fp16 on a CPU is emulated, ~8x slower than bf16: short runs
# the default recipe, shrunk to the 16 px test data: 6 steps per epoch, a log every 4 steps
DEFAULT = ["--recipe", "fashion-mnist-resnet9", "data.batch_size=32", "data.workers=0",
           "train.max_steps=12", "train.log_every=4", "log.wandb=false", "log.plots=false"]


def train(data, out, *extra, emulate=None, check=True, nproc=1):
    return run_shardtrain(["train", "--data", data, "--out", out, *DEFAULT, *extra],
                          emulate=emulate, check=check, nproc=nproc)


def train_fp16(data, out, *extra, emulate=(), check=True):
    fp16 = ["--fp16", str(INIT_SCALE), *emulate]
    return train(data, out, "data.batch_size=16", f"train.max_steps={FP16_STEPS}", *extra,
                 emulate=fp16, check=check)


def same_weights(a, b) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def scaler_state(run) -> dict:
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))["optim"]["scaler"]


# ---- fp16: a real GradScaler on CPU -------------------------------------------------------
@pytest.mark.parametrize("clipping", [
    pytest.param([], id="clip_value"),  # the recipe's clip_value 0.1
    pytest.param(["optim.clip_value=0", "optim.clip_norm=1.0"], id="clip_norm"),
    pytest.param(["train.grad_accum=2"], id="grad_accum_2"),
])
def test_fp16_grad_scaler_trains_the_default_recipe_and_counts_skipped_steps(
        learnable_shards, tmp_path, clipping):
    out = tmp_path / "fp16"
    train_fp16(learnable_shards, out, *clipping)
    final = read_json(out / "final.json")
    skipped = final["fp16_skipped_steps"]
    assert final["steps"] == FP16_STEPS and 1 <= skipped < FP16_STEPS
    # the scale halves on every skipped step and never grows here: the count is exact
    assert scaler_state(out)["scale"] == INIT_SCALE * 0.5**skipped
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert all(math.isfinite(r["train/loss"]) for r in logged)


def test_fp16_scaler_state_resumes_bitwise(learnable_shards, tmp_path):
    train_fp16(learnable_shards, tmp_path / "a")
    b = tmp_path / "b"
    r = train_fp16(learnable_shards, b, emulate=["--preempt-at", "2"], check=False)
    assert r.returncode == 75, r.stderr[-2000:]
    assert scaler_state(b)["scale"] < INIT_SCALE  # preempted while the scaler was still backing off
    train_fp16(learnable_shards, b, "--resume", "auto")
    assert same_weights(tmp_path / "a" / "model.safetensors", b / "model.safetensors")
    assert scaler_state(tmp_path / "a") == scaler_state(b)
    fa, fb = read_json(tmp_path / "a" / "final.json"), read_json(b / "final.json")
    assert fa["fp16_skipped_steps"] == fb["fp16_skipped_steps"] and fa["test_acc"] == fb["test_acc"]


def test_lr_find_with_fp16_and_both_clippings(learnable_shards, tmp_path):
    out = tmp_path / "lr.png"
    run_shardtrain(["lr-find", "--recipe", "fashion-mnist-resnet9", "--data", learnable_shards,
                    "--steps", "6", "--out", out, "data.batch_size=16", "data.workers=0",
                    "optim.clip_norm=1.0"], emulate=["--fp16", "1024"])
    assert read_json(out.with_suffix(".json"))["steps_run"] == 6


# ---- bf16 + channels_last: the default recipe's configuration on this CPU -----------------
def test_default_recipe_bf16_channels_last_resumes_bitwise(learnable_shards, tmp_path):
    """`precision: auto` is bf16 on CPUs with AVX512-BF16/AMX (and Ampere+ GPUs); it is set
    explicitly here so that the test runs bf16 autocast on any CPU."""
    bf16 = ["train.precision=bf16", "train.checkpoint_every=3"]
    train(learnable_shards, tmp_path / "a", *bf16)
    b = tmp_path / "b"
    assert train(learnable_shards, b, *bf16, emulate=["--preempt-at", "5"],
                 check=False).returncode == 75
    train(learnable_shards, b, *bf16, "--resume", "auto")
    assert "channels_last: true" in (b / "config.yaml").read_text()
    assert same_weights(tmp_path / "a" / "model.safetensors", b / "model.safetensors")
    assert read_json(tmp_path / "a" / "final.json")["test_acc"] == read_json(
        b / "final.json")["test_acc"]


# ---- precision=auto on a GPU --------------------------------------------------------------
def test_auto_precision_asks_this_ranks_gpu_and_ignores_emulated_bf16(monkeypatch):
    """GPU 0 is an A100, GPU 1 a V100 (bf16 only emulated, which is_bf16_supported() counts by
    default). Each rank asks its own GPU (LOCAL_RANK), before accelerate has set the device:
    nothing may touch the current device (GPU 0) or allocate on it."""
    from shardtrain.train import resolve_precision

    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(major={0: 8, 1: 7}[index], name=f"gpu{index}")

    def touched(*args, **kwargs):
        raise AssertionError("touched the current CUDA device")

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", touched)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch, "tensor", touched)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_precision("auto", cuda=True) == "fp16"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_precision("auto", cuda=True) == "bf16"
    assert asked == [1, 0]


# ---- torch.compile ------------------------------------------------------------------------
def test_compiled_run_writes_plain_weights_that_resume_eval_predict_and_export(
        learnable_shards, tiny_recipe, tmp_path):
    out = tmp_path / "compiled"
    args = ["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
            "train.compile=true", "train.ema_decay=0.9", "log.plots=false"]
    compiled = ["--eager-compile"]
    run_shardtrain(args + ["train.max_steps=4"], emulate=compiled)
    for weights in [out / "model.safetensors", out / "checkpoints" / "best.safetensors",
                    latest_checkpoint(out / "checkpoints") / "model.safetensors"]:
        assert not [k for k in load_file(weights) if "_orig_mod" in k], weights
    run_shardtrain(args + ["train.max_steps=6", "--resume", "auto"], emulate=compiled)
    assert read_json(out / "final.json")["steps"] == 6
    r = run_shardtrain(["eval", "--checkpoint", out, "--data", learnable_shards])
    assert "test: acc=" in r.stdout
    image = next((learnable_shards.parent / "src" / "test" / "red").glob("*.png"))
    assert run_shardtrain(["predict", "--checkpoint", out, image]).stdout.startswith(f"{image}: ")
    run_shardtrain(["export", "--checkpoint", out, "--format", "torchscript"])
    assert (out / "model.pt").is_file()
