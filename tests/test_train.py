"""Training end to end: 1 process and a real 2-process `accelerate launch` on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import RUNS, read_json, read_jsonl, run_shardtrain
from shardtrain.data.index import load_index

pytestmark = RUNS  # real training subprocesses

RUN_FILES = ["config.yaml", "metrics.jsonl", "model.safetensors", "final.json", "eval.json",
             "checkpoints/latest", "checkpoints/best.safetensors", "plots/accuracy.png",
             "plots/loss.png", "plots/lr.png", "plots/confusion.png"]


def train(data, out, recipe, *overrides, nproc=1, **kw):
    return run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out,
                           *overrides], nproc=nproc, **kw)


@pytest.fixture(scope="module")
def one_process_run(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "run"
    result = train(learnable_shards, out, tiny_recipe, "train.epochs=4", "train.log_every=1")
    return out, result


def test_one_process_learns_and_writes_every_run_file(one_process_run, learnable_shards):
    out, result = one_process_run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps[-1]["train/loss"] < steps[0]["train/loss"]
    final = read_json(out / "final.json")
    index = load_index(learnable_shards)
    assert final["world_size"] == 1 and final["steps"] == 4 * (192 // 16)
    assert final["val_samples"] == index.splits["val"].num_samples
    assert final["test_samples"] == index.splits["test"].num_samples
    assert final["test_acc"] > 0.5  # 4 separable classes: chance is 0.25
    assert "test_acc=" in result.stdout and str(out) in result.stdout


def test_lr_schedule_is_torch_onecycle_and_ends_at_its_minimum(one_process_run):
    out, _ = one_process_run
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    max_lr, div, final_div = 0.01, 25.0, 1e4
    assert [r["step"] for r in steps] == list(range(1, 49))
    # torch's OneCycleLR with the peak at the same step (test_optim: round(0.25 * 47) = 12)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr, total_steps=48, pct_start=13 / 48,
                                                cycle_momentum=False)
    reference = []
    for _ in range(48):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [r["train/lr"] for r in steps] == pytest.approx(reference, rel=1e-9)
    assert steps[-1]["train/lr"] == pytest.approx(max_lr / (div * final_div), rel=1e-9)


def test_bf16_autocast_really_runs_in_bf16(one_process_run, learnable_shards, tiny_recipe,
                                           tmp_path):
    """Same weights, same first batch: the first loss differs from fp32 (bf16 matmuls round to
    8 bits of mantissa) but stays close; `steps == 4` alone would pass with autocast off."""
    fp32 = read_jsonl(one_process_run[0] / "metrics.jsonl")[0]
    out = tmp_path / "bf16"
    train(learnable_shards, out, tiny_recipe, "train.precision=bf16", "train.max_steps=2",
          "train.log_every=1", "log.plots=false")
    bf16 = read_jsonl(out / "metrics.jsonl")[0]
    assert fp32["step"] == bf16["step"] == 1
    assert bf16["train/loss"] != fp32["train/loss"]
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.05)
    assert read_json(out / "final.json")["steps"] == 2


def test_two_processes_match_eval_counts_and_identical_weights(learnable_shards, tiny_recipe,
                                                               tmp_path):
    out = tmp_path / "run2"
    result = train(learnable_shards, out, tiny_recipe, "train.epochs=2", nproc=2)
    final = read_json(out / "final.json")
    index = load_index(learnable_shards)
    assert final["world_size"] == 2, result.stderr[-2000:]
    assert final["ranks_identical"] is True
    assert final["steps"] == 2 * (192 // 16)  # global batch 16: same steps as one process
    assert final["val_samples"] == index.splits["val"].num_samples
    assert final["test_samples"] == index.splits["test"].num_samples
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps[-1]["train/lr"] == pytest.approx(0.01 / 25 / 1e4, rel=1e-9)
    assert result.stdout.count("done:") == 1  # printed once per job, not per process
    assert not list(out.glob("**/*rank1*"))  # only rank 0 writes run files


def test_uneven_shards_on_two_ranks_do_not_hang_and_count_exactly(uneven_shards, tiny_recipe,
                                                                  tmp_path):
    """5 shards of 20,20,20,20,10 on 2 ranks; a test split of 33 (odd) samples."""
    out = tmp_path / "uneven"
    train(uneven_shards, out, tiny_recipe, "data.batch_size=8", "data.workers=2",
          "train.epochs=1", "data.image_size=8", "model.widths=[8,8,8,8]", nproc=2, timeout=240)
    final = read_json(out / "final.json")
    assert final["steps"] == 90 // 8 and final["test_samples"] == 33
    assert final["ranks_identical"] is True


def test_weights_file_is_self_describing(one_process_run, learnable_shards):
    out, _ = one_process_run
    index = load_index(learnable_shards)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["shardtrain"])  # load_file() would drop the metadata
        keys = set(f.keys())
    assert meta["model"] == "resnet9" and meta["model_kwargs"]["widths"] == [8, 16, 16, 32]
    assert meta["classes"] == index.classes == ["blue", "gray", "green", "red"]
    assert (meta["channels"], meta["image_size"], meta["scaling"]) == (3, 16, "standardize")
    assert meta["mean"] == pytest.approx(index.mean) and meta["std"] == pytest.approx(index.std)
    assert len(set(meta["mean"])) == 3  # per-channel statistics of this data, not defaults
    assert keys == set(load_file(out / "checkpoints" / "best.safetensors"))


@pytest.mark.parametrize("args,message", [
    (["optim.max_lrr=0.1"], "did you mean 'optim.max_lr'"),
    (["train.epochs=lots"], "train.epochs must be int"),
    (["data.batch_size=1000"], "fewer than one global batch"),
])
def test_user_mistakes_are_one_line_exit_2(learnable_shards, tiny_recipe, tmp_path, args, message):
    result = train(learnable_shards, tmp_path / "bad", tiny_recipe, *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_data_folder_and_unknown_recipe(tmp_path, tiny_recipe):
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", tmp_path / "nope"],
                       check=False)
    assert r.returncode == 2 and "data folder not found" in r.stderr and "Traceback" not in r.stderr
    r = run_shardtrain(["train", "--recipe", "fashion-mnist-resnet", "--data", tmp_path],
                       check=False)
    assert r.returncode == 2 and "did you mean" in r.stderr


def test_logged_loss_is_the_mean_over_ranks_and_micro_batches(learnable_shards, tiny_recipe,
                                                              tmp_path):
    """2 processes x grad_accum 2: train/loss of a step is the mean of its 4 micro-batch losses
    (recorded by tests/emulate.py); train/grad_norm is measured before clip-by-value; and
    model.sync_bn=true on CPU says once that it is ignored."""
    out, losses = tmp_path / "run", tmp_path / "losses"
    clip = 1e-6
    r = train(learnable_shards, out, tiny_recipe, "train.grad_accum=2", "train.max_steps=3",
              "train.log_every=1", f"optim.clip_value={clip}", "model.sync_bn=true",
              "log.plots=false", nproc=2, emulate=["--record-losses", losses])
    recorded = read_jsonl(losses / "rank0.jsonl") + read_jsonl(losses / "rank1.jsonl")
    logged = [x for x in read_jsonl(out / "metrics.jsonl") if x["kind"] == "step"]
    assert [x["step"] for x in logged] == [1, 2, 3]
    for x in logged:
        mine = [m["loss"] for m in recorded if m["step"] == x["step"]]
        assert len(mine) == 4 and x["train/loss"] == pytest.approx(sum(mine) / 4, rel=1e-5)
    from shardtrain.models import create_model

    n = sum(p.numel() for p in create_model("resnet9", 4, 3, widths=[8, 16, 16, 32]).parameters())
    assert all(x["train/grad_norm"] > clip * n**0.5 for x in logged)  # above any clipped norm
    assert (r.stdout + r.stderr).count("model.sync_bn=true is ignored on CPU") == 1
