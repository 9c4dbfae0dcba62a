"""Damaged shards at train time: skipped and reported, or refused before the first step."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from helpers import RUNS, read_json, run_shardtrain
from shardtrain.data.index import load_index, sample_table

pytestmark = RUNS  # real training subprocesses


def damaged_copy(src, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(src, d)
    return d, sample_table(load_index(d), "train")


def train(data, out, recipe, *extra):
    return run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out,
                           "train.epochs=2", *extra], check=False)


def test_corrupt_sample_is_skipped_counted_and_reported(learnable_shards, tiny_recipe, tmp_path):
    d, table = damaged_copy(learnable_shards, tmp_path)
    victim = int(np.flatnonzero(table.shard == 0)[3])
    shard = table.shard_paths[0]
    data = bytearray(shard.read_bytes())
    data[table.offset[victim]:table.offset[victim] + 8] = b"garbage!"  # breaks the .npy header
    shard.write_bytes(bytes(data))
    r = train(d, tmp_path / "sum", tiny_recipe, "data.verify_checksums=true")
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "sum" / "metrics.jsonl").exists()  # refused before the first step
    r = train(d, tmp_path / "run", tiny_recipe, "data.verify_checksums=false")
    assert r.returncode == 0, r.stderr[-2000:]
    final = read_json(tmp_path / "run" / "final.json")
    assert final["skipped_samples"] == 2  # once per epoch
    assert f"{victim:08d}" in final["skipped_examples"][0]
    assert "skipped corrupt sample" in r.stderr + r.stdout


def test_truncated_shard_is_read_up_to_the_damage(learnable_shards, tiny_recipe, tmp_path):
    d, table = damaged_copy(learnable_shards, tmp_path)
    shard = table.shard_paths[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = train(d, tmp_path / "run", tiny_recipe, "data.verify_checksums=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reading it up to the damage" in r.stdout + r.stderr
    final = read_json(tmp_path / "run" / "final.json")
    assert 0 < final["skipped_samples"] < 2 * 32  # only the unreadable half, each epoch


def test_missing_shard_is_an_error_before_the_first_step(learnable_shards, tiny_recipe, tmp_path):
    d, table = damaged_copy(learnable_shards, tmp_path)
    table.shard_paths[2].unlink()
    r = train(d, tmp_path / "run", tiny_recipe)
    assert r.returncode == 1 and "train-000002.tar: missing" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_batch_not_divisible_is_a_user_error(learnable_shards, tiny_recipe, tmp_path):
    r = train(learnable_shards, tmp_path / "run", tiny_recipe, "data.batch_size=15",
              "train.grad_accum=2")
    assert r.returncode == 2 and "not divisible" in r.stderr and "Traceback" not in r.stderr


def test_fp16_on_cpu_is_refused(learnable_shards, tiny_recipe, tmp_path):
    r = train(learnable_shards, tmp_path / "run", tiny_recipe, "train.precision=fp16")
    assert r.returncode == 2 and "fp16 needs a CUDA GPU" in r.stderr


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    from shardtrain.train import resolve_precision

    assert resolve_precision("no", cuda=False) == "no"  # explicit choices are kept
    assert resolve_precision("bf16", cuda=False) == "bf16"
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"),
                                       (False, False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", cuda=False) == expected
    # on GPUs: tests/test_gpu_paths.py (which GPU is asked, and emulated bf16 does not count)


def damage(table, victims) -> None:
    """Break the .npy header of each sample id in `victims` (in place)."""
    for shard_index, path in enumerate(table.shard_paths):
        data = bytearray(path.read_bytes())
        for v in victims:
            if table.shard[v] == shard_index:
                data[table.offset[v]:table.offset[v] + 8] = b"garbage!"
        path.write_bytes(bytes(data))


def plan_for(table, batch, world, rank):
    from shardtrain.data.plan import TrainPlan

    sizes = tuple(int((table.shard == s).sum()) for s in range(len(table.shard_paths)))
    return TrainPlan(sizes, batch, world, rank, grad_accum=1, seed=0, window=4)


def test_skipped_counts_survive_a_two_process_resume(learnable_shards, tiny_recipe, tmp_path):
    """3 damaged samples, all read by rank 0 in epoch 1; preempted at step 13, resumed on 2
    processes: every epoch skips each of them once, whichever rank reads it."""
    d, table = damaged_copy(learnable_shards, tmp_path)
    rank0 = plan_for(table, 16, 2, 0)
    victims = [int(i) for i in rank0.micro_batch(0)[1][:2]] + [int(rank0.micro_batch(5)[1][0])]
    damage(table, victims)
    out = tmp_path / "run"
    args = ["train", "--recipe", tiny_recipe, "--data", d, "--out", out, "train.epochs=3",
            "data.verify_checksums=false", "log.plots=false"]
    r = run_shardtrain(args, nproc=2, check=False, emulate=["--preempt-at", "13"])
    assert r.returncode != 0 and "preempted: checkpoint at step 13" in r.stderr, r.stderr[-3000:]
    run_shardtrain(args + ["--resume", "auto"], nproc=2)
    final = read_json(out / "final.json")
    assert final["skipped_samples"] == 3 * 3
    assert len(final["skipped_examples"]) == 9  # every rank's, not only rank 0's
    for v in victims:
        assert sum(f"{v:08d}" in e for e in final["skipped_examples"]) == 3


def test_micro_batches_with_fewer_than_two_samples_are_skipped_on_every_rank(learnable_shards,
                                                                            tiny_recipe,
                                                                            tmp_path):
    """MLP with BatchNorm1d, 2 processes, 4 samples per micro-batch: in step 1 rank 0 has no
    readable sample and rank 1 only one. Both micro-batches are skipped and counted; the
    ranks stay in step (no hang) and identical."""
    d, table = damaged_copy(learnable_shards, tmp_path)
    first = [plan_for(table, 8, 2, rank).micro_batch(0)[1] for rank in (0, 1)]
    damage(table, [int(i) for i in first[0]] + [int(i) for i in first[1][1:]])
    out = tmp_path / "run"
    r = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", d, "--out", out,
                        "model.name=mlp", "model.hidden=[32]", "data.batch_size=8",
                        "train.max_steps=3", "data.verify_checksums=false", "log.plots=false",
                        "train.dist_timeout=30"], nproc=2, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    final = read_json(out / "final.json")
    assert final["skipped_samples"] == 7 and final["skipped_micro_batches"] == 2
    assert final["ranks_identical"] is True
    assert "skipped micro-batch" in r.stderr + r.stdout
