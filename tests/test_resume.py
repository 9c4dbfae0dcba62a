"""Fault tolerance: bitwise-exact resume after kill -9, preemption, refusals, atomic checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import launch_cmd, read_json, read_jsonl, run_shardtrain, shardtrain_env
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

# dropout on: the global RNG must be restored too for a bitwise-identical resume
COMMON = ["train.epochs=3", "train.checkpoint_every=5", "train.log_every=1",
          "model.widths=[16,32,32,64]", "model.dropout=0.2"]


def train_args(data, out, recipe, *extra):
    return ["train", "--recipe", recipe, "--data", data, "--out", out, *COMMON, *extra]


def start(args, nproc, env=None):
    return subprocess.Popen(launch_cmd(nproc) + [str(a) for a in args],
                            env=shardtrain_env(nproc, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(out: Path, proc, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until `step` is logged; return the last logged step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists():
            steps = [r["step"] for r in read_jsonl(path) if r["kind"] == "step"]
            if steps and steps[-1] >= step:
                return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"exited early {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    kill_tree(proc)
    raise AssertionError("timed out waiting for training progress")


def kill_tree(proc, sig=signal.SIGKILL) -> None:
    """Signal the launcher and every descendant: torch elastic starts its workers in their own
    sessions, so killing the launcher's process group would leave them training as orphans."""
    victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("nproc,workers", [
    (1, 0), pytest.param(1, 2, marks=pytest.mark.slow), pytest.param(2, 0, marks=pytest.mark.slow),
    (2, 2)])
def test_kill_9_between_checkpoints_then_resume_is_bitwise_identical(
        learnable_shards, tiny_recipe, tmp_path, nproc, workers):
    data = [f"data.workers={workers}"]
    run_a = tmp_path / "a"
    run_shardtrain(train_args(learnable_shards, run_a, tiny_recipe, *data), nproc=nproc)
    run_b = tmp_path / "b"
    proc = start(train_args(learnable_shards, run_b, tiny_recipe, *data), nproc)
    killed_at = wait_for_step(run_b, proc, 7)
    kill_tree(proc)
    proc.wait()
    ckpt_step = load_checkpoint(latest_checkpoint(run_b / "checkpoints"))["trainer"]["step"]
    assert ckpt_step < killed_at < 36 and not (run_b / "final.json").exists()
    run_shardtrain(train_args(learnable_shards, run_b, tiny_recipe, *data, "--resume", "auto"),
                   nproc=nproc)
    assert same_weights(run_a / "model.safetensors", run_b / "model.safetensors")
    a, b = read_json(run_a / "final.json"), read_json(run_b / "final.json")
    assert a["steps"] == b["steps"] == 36 and a["test_acc"] == b["test_acc"]
    steps = [r["step"] for r in read_jsonl(run_b / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 37))  # no duplicated or missing step records after resume


def test_preempted_run_resumes_with_another_world_size(learnable_shards, tiny_recipe, tmp_path):
    """SIGUSR1 -> checkpoint at the current step, exit 75; resume on 2 processes finishes."""
    out = tmp_path / "run"
    # loader workers running: SLURM signals every process, they must not die of it
    proc = start(train_args(learnable_shards, out, tiny_recipe, "data.workers=2"), nproc=1)
    wait_for_step(out, proc, 3)
    kill_tree(proc, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    saved = load_checkpoint(latest_checkpoint(out / "checkpoints"))["trainer"]
    assert saved["step"] >= 3 and saved["world_size"] == 1
    result = run_shardtrain(train_args(learnable_shards, out, tiny_recipe, "data.workers=2",
                                       "--resume", "auto"), nproc=2)
    assert "resumed from step" in result.stdout + result.stderr
    final = read_json(out / "final.json")
    assert final["steps"] == 36 and final["world_size"] == 2
    lrs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in lrs] == list(range(1, 37))  # schedule position kept
    assert lrs[-1]["train/lr"] == pytest.approx(0.01 / 25 / 1e4, rel=1e-9)


@pytest.fixture(scope="module")
def finished_run(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "train.max_steps=4"])
    return out


def test_resume_refuses_another_dataset_or_model(finished_run, learnable_shards, uneven_shards,
                                                 tiny_recipe, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    base = ["train", "--recipe", tiny_recipe, "--out", run, "--resume", "auto"]
    r = run_shardtrain(base + ["--data", uneven_shards], check=False)
    assert r.returncode == 2 and "classes differ" in r.stderr and "Traceback" not in r.stderr
    r = run_shardtrain(base + ["--data", learnable_shards, "model.widths=[8,8,8,8]"],
                       check=False)
    assert r.returncode == 2 and "config differs" in r.stderr and "--allow-changes" in r.stderr
    r = run_shardtrain(base + ["--data", learnable_shards, "model.widths=[8,8,8,8]",
                               "--allow-changes"], check=False)
    assert r.returncode == 2 and "model shape differs" in r.stderr
    r = run_shardtrain(base + ["--data", learnable_shards, "train.max_steps=6"])
    assert read_json(run / "final.json")["steps"] == 6  # more steps is a compatible change


def test_crash_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    class Exploding:
        def __reduce__(self):
            raise RuntimeError("power cut")

    model = {"w": torch.ones(2, 2)}
    common = dict(model_state=model, meta={"model": "x"}, rng_states=[], keep=2)
    save_checkpoint(tmp_path, 5, optim_state={"a": 1}, trainer={"step": 5}, **common)
    with pytest.raises(RuntimeError, match="power cut"):
        save_checkpoint(tmp_path, 10, optim_state={"a": Exploding()}, trainer={"step": 10},
                        **common)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-000005" and load_checkpoint(latest)["trainer"]["step"] == 5
    assert not (tmp_path / "step-000010").exists()
    save_checkpoint(tmp_path, 10, optim_state={"a": 2}, trainer={"step": 10}, **common)
    assert latest_checkpoint(tmp_path).name == "step-000010"


def test_keeps_last_k_and_best(finished_run):
    ckpts = finished_run / "checkpoints"
    assert len(list(ckpts.glob("step-*"))) <= 2 and (ckpts / "best.safetensors").is_file()


def test_checkpoints_load_without_pickled_code(finished_run):
    folder = latest_checkpoint(finished_run / "checkpoints")
    for name in ("optimizer.pt", "rng.pt"):  # weights_only=True would refuse arbitrary objects
        torch.load(folder / name, weights_only=True)
    assert json.loads((folder / "trainer.json").read_text())["step"] == 4


def test_non_finite_loss_stops_with_step_and_keeps_good_checkpoint(learnable_shards,
                                                                    tiny_recipe, tmp_path):
    out = tmp_path / "nan"
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out",
                        out, "optim.name=sgd", "optim.max_lr=1e30", "optim.clip_value=0",
                        "optim.warmup_frac=0", "train.log_every=1"], check=False)
    assert r.returncode == 3 and "non-finite loss at optimizer step" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (out / "final.json").exists()
    folder = latest_checkpoint(out / "checkpoints")
    if folder:  # any checkpoint kept is from before the bad step, with finite weights
        weights = load_checkpoint(folder)["model"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_api_keys_never_reach_run_files(finished_run, learnable_shards, tiny_recipe, tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "train.max_steps=2", "log.wandb=true"], env={"WANDB_API_KEY": secret})
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
