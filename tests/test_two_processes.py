"""One real 2-process run with gradient accumulation on data with corrupt val/test samples:
one optimizer step per global batch and the LR at its minimum on the last one, skipped eval
samples summed over the ranks, and `shardtrain eval` giving the same result on 1 and 2 processes.
"""

from __future__ import annotations

import shutil

import pytest

from helpers import RUNS, read_json, read_jsonl, run_shardtrain
from shardtrain.data.index import load_index, sample_table
from shardtrain.optim import lr_factor

pytestmark = RUNS  # real training subprocesses

# eval rank r reads samples r, r + 2, ... (plan.eval_ids): one damaged sample on each rank
DAMAGED = {"val": [4, 7], "test": [2, 9]}


def damage_samples(src, dst):
    """Copy the shards and overwrite the .npy header of the DAMAGED samples."""
    shutil.copytree(src, dst)
    index = load_index(dst)
    for split, ids in DAMAGED.items():
        table = sample_table(index, split)
        for i in ids:
            path = table.shard_paths[table.shard[i]]
            data = bytearray(path.read_bytes())
            data[table.offset[i]:table.offset[i] + 8] = b"garbage!"
            path.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def accum_run(learnable_shards, tiny_recipe, tmp_path_factory):
    base = tmp_path_factory.mktemp("accum")
    data = damage_samples(learnable_shards, base / "shards")
    out = base / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", data, "--out", out,
                    "train.grad_accum=2", "train.epochs=1", "train.log_every=1",
                    "data.verify_checksums=false", "log.plots=false"], nproc=2)
    return data, out


def test_grad_accum_2_on_two_processes_steps_once_per_global_batch(accum_run):
    """Global batch 16 = 2 ranks x 2 micro-batches x 4: 192 samples are 12 optimizer steps (24
    if the optimizer stepped on every micro-batch); the LR follows the 12-step schedule."""
    _, out = accum_run
    final = read_json(out / "final.json")
    assert final["world_size"] == 2 and final["steps"] == 12 and final["ranks_identical"]
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    expected = [0.01 * lr_factor(k, 12, "onecycle", 0.25, 25.0, 1e4) for k in range(12)]
    assert [r["train/lr"] for r in steps] == pytest.approx(expected, rel=1e-9)
    assert steps[-1]["train/lr"] == pytest.approx(0.01 / 25 / 1e4, rel=1e-9)


def test_skipped_eval_samples_are_summed_over_ranks(accum_run, learnable_shards):
    _, out = accum_run
    final = read_json(out / "final.json")
    index = load_index(learnable_shards)
    for split, ids in DAMAGED.items():
        assert final[f"{split}_skipped"] == len(ids), split  # rank 0 alone saw one of them
        assert final[f"{split}_samples"] == index.splits[split].num_samples - len(ids)


def test_eval_is_exact_on_one_and_two_processes(accum_run):
    data, out = accum_run
    trained = read_json(out / "eval.json")["test"]  # evaluated by the 2 training processes
    for nproc in (1, 2):
        report = out / f"eval-{nproc}.json"
        result = run_shardtrain(["eval", "--checkpoint", out, "--data", data, "--split", "test",
                                 "--out", report, "--batch-size", "3"], nproc=nproc)
        assert result.stdout.count("test: acc=") == 1
        got = read_json(report)
        assert (got["samples"], got["skipped"]) == (38, 2), nproc
        assert got["acc"] == trained["acc"] and got["confusion"] == trained["confusion"], nproc
        assert got["loss"] == pytest.approx(trained["loss"], rel=1e-5)
