"""Fault tolerance: bitwise-exact resume after kill -9, preemption, refusals, atomic checkpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (RUNS, kill_tree, logged_steps, read_json, read_jsonl, run_shardtrain,
                     signal_at_known_step, start, wait_for_step)
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

pytestmark = RUNS  # real training subprocesses

# dropout on: the global RNG must be restored too for a bitwise-identical resume
COMMON = ["train.epochs=3", "train.checkpoint_every=5", "train.log_every=1",
          "model.widths=[16,32,32,64]", "model.dropout=0.2"]


def train_args(data, out, recipe, *extra):
    return ["train", "--recipe", recipe, "--data", data, "--out", out, *COMMON, *extra]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# 2 processes with 0 workers, killed mid-epoch, are also in the default suite: test_tracking's
# W&B resume test compares its weights bitwise with an uninterrupted run
@pytest.mark.parametrize("nproc,workers", [
    (1, 0), pytest.param(1, 2, marks=pytest.mark.slow), pytest.param(2, 0, marks=pytest.mark.slow),
    pytest.param(2, 2, marks=pytest.mark.slow)])
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
    """SIGUSR1 -> checkpoint at the step that handled it, exit 75; resume on 2 processes."""
    out = tmp_path / "run"
    # loader workers running: SLURM signals every process, they must not die of it
    proc = start(train_args(learnable_shards, out, tiny_recipe, "data.workers=2"), nproc=1)
    handled = signal_at_known_step(out, proc, signal.SIGUSR1, after=3)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    assert f"preempted: checkpoint at step {handled}," in proc.stdout.read() + proc.stderr.read()
    saved = load_checkpoint(latest_checkpoint(out / "checkpoints"))["trainer"]
    assert saved["step"] == handled and saved["world_size"] == 1
    assert logged_steps(out)[-1] == handled  # it stopped there: no step after the signal
    result = run_shardtrain(train_args(learnable_shards, out, tiny_recipe, "--resume", "auto"),
                            nproc=2)
    assert f"resumed from step {handled} (1 -> 2 processes)" in result.stdout + result.stderr
    final = read_json(out / "final.json")
    assert final["steps"] == 36 and final["world_size"] == 2
    lrs = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in lrs] == list(range(1, 37))  # schedule position kept
    assert lrs[-1]["train/lr"] == pytest.approx(0.01 / 25 / 1e4, rel=1e-9)


@pytest.fixture(scope="module")
def finished_run(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "train.max_steps=4", "train.checkpoint_every=1", "log.plots=false"])
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


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.name[len("step-"):]) for p in root.glob("step-*"))


def test_keeps_the_newest_keep_checkpoints_and_the_best(finished_run):
    """Checkpoints at steps 1..4, train.keep_checkpoints=2 (the default): 3 and 4 are kept."""
    ckpts = finished_run / "checkpoints"
    assert checkpoint_steps(ckpts) == [3, 4] and latest_checkpoint(ckpts).name == "step-000004"
    assert (ckpts / "best.safetensors").is_file()


def test_checkpoints_load_without_pickled_code(finished_run):
    folder = latest_checkpoint(finished_run / "checkpoints")
    for name in ("optimizer.pt", "rng.pt"):  # weights_only=True would refuse arbitrary objects
        torch.load(folder / name, weights_only=True)
    assert json.loads((folder / "trainer.json").read_text())["step"] == 4


# SGD at lr 300 diverges within the first epoch (12 steps); whether the loss or the BN running
# statistics become non-finite first depends on the exact arithmetic, so the tests accept both
DIVERGE = ["optim.name=sgd", "optim.max_lr=300", "optim.clip_value=0", "log.plots=false"]
STOP = re.compile(r"non-finite (loss at|weights after) optimizer step (\d+): stopping")


def diverge(data, recipe, out, *overrides) -> tuple[str, int]:
    """Run until the divergence stops it (exit 3); returns ('loss at'|'weights after', step)."""
    r = run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out, *DIVERGE,
                        *overrides], check=False)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (out / "final.json").exists()
    (found,) = STOP.findall(r.stderr)
    return found[0], int(found[1])


def finite(folder: Path) -> bool:
    weights = load_checkpoint(folder)["model"]
    return all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_non_finite_loss_is_named_at_the_first_step_that_had_it(learnable_shards, tiny_recipe,
                                                                 tmp_path):
    """Checked every step (log_every=1): every logged loss is finite and the run names the step
    right after the last one logged (or, for weights, the epoch-end checkpoint it refused)."""
    out = tmp_path / "nan"
    kind, step = diverge(learnable_shards, tiny_recipe, out, "train.log_every=1")
    losses = [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert all(map(math.isfinite, losses))  # nothing is logged past a non-finite loss
    if kind == "loss at":
        assert step == len(losses) + 1
    else:
        assert step == len(losses) and step % 12 == 0
    assert all(s < step for s in checkpoint_steps(out / "checkpoints"))


@pytest.mark.parametrize("every", [3, 4, 6])
def test_divergence_between_checkpoints_keeps_only_finite_checkpoints_before_it(
        learnable_shards, tiny_recipe, tmp_path, every):
    """Checked only at boundaries (log_every 1000, checkpoints every 3, 4 or 6 steps): the run
    stops with exit 3 and every checkpoint left (keep_checkpoints=1) is finite and from before
    the step it names; a checkpoint of non-finite weights or BN statistics is refused."""
    out = tmp_path / "nan"
    _, step = diverge(learnable_shards, tiny_recipe, out, "train.log_every=1000",
                      f"train.checkpoint_every={every}", "train.keep_checkpoints=1")
    kept = checkpoint_steps(out / "checkpoints")  # none if the first one was already refused
    assert len(kept) <= 1 and all(k < step and k % every == 0 for k in kept), (kept, step)
    if kept:
        latest = latest_checkpoint(out / "checkpoints")
        assert load_checkpoint(latest)["trainer"]["step"] == kept[0] and finite(latest)


def test_api_keys_never_reach_run_files(finished_run, learnable_shards, tiny_recipe, tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    "train.max_steps=2", "log.wandb=true"], env={"WANDB_API_KEY": secret})
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# ---- pruning and run folders --------------------------------------------------------------
def fake_checkpoint(root: Path, step: int) -> None:
    save_checkpoint(root, step, model_state={"w": torch.ones(1)}, meta={"model": "x"},
                    optim_state={}, rng_states=[], trainer={"step": step}, keep=100)


def test_pruning_goes_by_step_number_and_never_removes_the_newest(tmp_path):
    for step in (999_998, 999_999):
        fake_checkpoint(tmp_path, step)
    save_checkpoint(tmp_path, 1_000_000, model_state={"w": torch.ones(1)}, meta={"model": "x"},
                    optim_state={}, rng_states=[], trainer={"step": 1_000_000}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-1000000", "step-999999"]
    assert latest_checkpoint(tmp_path).name == "step-1000000"
    # an older run left higher step numbers: the checkpoint just written still survives
    other = tmp_path / "other"
    for step in (480, 960):
        fake_checkpoint(other, step)
    save_checkpoint(other, 12, model_state={"w": torch.ones(1)}, meta={"model": "x"},
                    optim_state={}, rng_states=[], trainer={"step": 12}, keep=1)
    assert latest_checkpoint(other).name == "step-000012"


def test_training_into_a_folder_holding_a_run_is_refused_without_resume(finished_run,
                                                                       learnable_shards,
                                                                       tiny_recipe, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out",
                        run, "train.max_steps=2"], check=False)
    assert r.returncode == 2 and "--resume auto" in r.stderr and "--out" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_resume_auto_refuses_a_dangling_latest_instead_of_restarting(finished_run,
                                                                    learnable_shards,
                                                                    tiny_recipe, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(latest_checkpoint(run / "checkpoints"))
    metrics = (run / "metrics.jsonl").read_bytes()
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out",
                        run, "--resume", "auto"], check=False)
    assert r.returncode == 1 and "checkpoints/latest" in r.stderr and "Traceback" not in r.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics  # not truncated by a restart


# ---- a preempted, then extended run, on a clock that only counts steps (tests/emulate.py) ---
@pytest.fixture(scope="module")
def extended_run(learnable_shards, tiny_recipe, tmp_path_factory):
    """10 steps planned, checkpoints every 2 (3 kept), preempted after step 7; resumed with
    train.max_steps=14. Fake clock: 1 s per step, 100 s per checkpoint, 1000 s per eval."""
    out = tmp_path_factory.mktemp("extended") / "run"
    args = ["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
            "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.log_every=1",
            "log.plots=false"]
    first = run_shardtrain(args + ["train.max_steps=10"], check=False,
                           emulate=["--fake-clock", "--preempt-at", "7"])
    kept_first = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    run_shardtrain(args + ["train.max_steps=14", "--resume", "auto"], emulate=["--fake-clock"])
    return out, first, kept_first


def test_checkpoints_are_pruned_to_keep_checkpoints(extended_run):
    out, first, kept_first = extended_run
    assert first.returncode == 75, first.stderr[-2000:]
    assert kept_first == ["step-000004", "step-000006", "step-000007"]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-000010", "step-000012", "step-000014"]


def test_train_seconds_count_training_only(extended_run):
    out, _, _ = extended_run
    final = read_json(out / "final.json")
    assert final["steps"] == 14 and final["train_seconds"] == 14.0  # no checkpoint or eval time
    assert final["images_per_second"] == 16.0  # batch 16 per 1 s step
    rates = [r["train/images_per_sec"] for r in read_jsonl(out / "metrics.jsonl")
             if r["kind"] == "step"]
    assert rates == [16.0] * 14


def test_extending_a_run_keeps_the_lr_continuous(extended_run):
    """Step 8 uses the lr the 10-step schedule gave it; the rest of that schedule is then
    stretched over steps 8..14, down to the same final lr."""
    from shardtrain.optim import lr_factor

    out, _, _ = extended_run
    lrs = [r["train/lr"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    planned = [0.01 * lr_factor(k, 10, "onecycle", 0.25, 25, 1e4) for k in range(10)]
    assert lrs[:8] == pytest.approx(planned[:8], rel=1e-12)
    assert all(b < a for a, b in zip(lrs[7:], lrs[8:]))  # still annealing, no jump back up
    assert lrs[-1] == pytest.approx(0.01 / 25 / 1e4, rel=1e-9)


# ---- preemption at an epoch end ----------------------------------------------------------
def test_preemption_at_an_epoch_end_still_validates_that_epoch(learnable_shards, tiny_recipe,
                                                              tmp_path):
    """12 steps per epoch, 2 epochs: preempted at the end of epoch 1, then at the last step."""
    out = tmp_path / "run"
    args = ["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
            "train.epochs=2", "log.plots=false"]
    r = run_shardtrain(args, check=False, emulate=["--preempt-at", "12"])
    assert r.returncode == 75, r.stderr[-2000:]
    epochs = [x for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "epoch"]
    assert [x["step"] for x in epochs] == [12]
    assert (out / "checkpoints" / "best.safetensors").is_file()
    r = run_shardtrain(args + ["--resume", "auto"], check=False, emulate=["--preempt-at", "24"])
    assert r.returncode == 75, r.stderr[-2000:]
    run_shardtrain(args + ["--resume", "auto"])
    epochs = [x for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "epoch"]
    assert [x["step"] for x in epochs] == [12, 24]
    assert read_json(out / "final.json")["val_acc"] == epochs[-1]["val/acc"]


# ---- a non-finite loss -------------------------------------------------------------------
@pytest.mark.parametrize("nproc,bad", [(1, "6:0"), (2, "8:1")])
def test_non_finite_loss_after_a_checkpoint_stops_every_rank_before_saving(
        learnable_shards, tiny_recipe, tmp_path, nproc, bad):
    """Checkpoints every 4 steps. One process: NaN at step 6, found at the step-8 check. Two:
    NaN at step 8 on rank 1 only, where rank 0's own loss is finite: both ranks must stop."""
    out = tmp_path / "nan"
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out",
                        out, "train.checkpoint_every=4", "train.log_every=4",
                        "train.dist_timeout=30"], nproc=nproc, check=False,
                       emulate=["--nan-at", bad])
    step = bad.split(":")[0]
    assert f"non-finite loss at optimizer step {step}:" in r.stderr, r.stderr[-3000:]
    assert r.returncode == (3 if nproc == 1 else 1)  # accelerate's launcher exits 1 for any code
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000004"]
    weights = load_checkpoint(latest_checkpoint(out / "checkpoints"))["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not (out / "final.json").exists()
