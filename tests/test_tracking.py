"""Tracking end to end with W&B offline: one run per job, read back, resumed, compared, swept.

Every W&B run here is offline (helpers.run_shardtrain sets WANDB_MODE=offline) and read back from
its `.wandb` record file with wandb_offline (no server).
"""

from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fake_wandb_server import FakeWandbServer
from helpers import (RUNS, kill_tree, logged_steps, read_json, read_jsonl, run_shardtrain, start,
                     wait_for_step)
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint
from shardtrain.data.index import index_hash, load_index
from shardtrain.tracking.sweep import (
    grid_points,
    list_sweeps,
    make_sweep,
    parse_grid_arg,
    point_name,
    point_overrides,
)
from wandb_offline import find_offline_runs, read_offline_run, read_offline_runs_by_id

pytest.importorskip("wandb")

MEDIA = {"media/predictions", "media/confusion_matrix", "media/lr_schedule", "media/weights",
         "media/prediction_table", "media/confusion_chart_table"}

pytestmark = RUNS  # real training subprocesses


def train(data, out, recipe, *args, nproc=1):
    return run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out, *args],
                          nproc=nproc, timeout=240)


def same(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b, rel=1e-9)


@pytest.fixture(scope="module")
def two_process_run(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("track") / "run2"
    # checkpoint_every as in the resumed test below: on 2 processes each checkpoint averages
    # the BN running statistics of the ranks (evaluate.sync_bn_stats), which then differ from
    # what DDP's buffer broadcast alone gives; the weights do not depend on it
    train(learnable_shards, out, tiny_recipe, "train.epochs=2", "log.wandb=true",
          "log.tags=[t1,t2]", "log.histograms=true", "log.predictions=24",
          "train.checkpoint_every=5", nproc=2)
    return out


def test_two_process_run_is_one_wandb_run_matching_the_run_files(two_process_run,
                                                                  learnable_shards):
    out = two_process_run
    (folder,) = find_offline_runs(out / "wandb")  # exactly one run, made by rank 0
    final = read_json(out / "final.json")
    run = read_offline_runs_by_id(out / "wandb", final["wandb_run_id"], wait_seconds=10)
    assert run.exited and run.paths == [folder]
    assert (run.group, run.tags, run.job_type) == ("tiny", ["t1", "t2"], "train")
    assert run.name.startswith("tiny-")
    # history: every metrics.jsonl record is in the row of its optimizer step, same values
    rows = {r["_step"]: r for r in run.history}
    steps = [r["_step"] for r in run.history]
    assert steps == sorted(set(steps))
    for record in read_jsonl(out / "metrics.jsonl"):
        row = rows[record["step"]]
        for key, value in record.items():
            if key not in ("kind", "step", "epoch"):
                assert same(row[key], value), (record["step"], key)
    assert {"train/loss", "train/lr", "train/images_per_sec", "train/grad_norm"} <= set(rows[2])
    assert {"val/loss", "val/acc", "val/top5"} <= set(rows[12])
    assert rows[12]["epoch"] == 1 and rows[2]["epoch"] == pytest.approx(2 / 12)
    # summary and config
    for key in ("best_val_acc", "test_acc", "test_top5", "train_seconds", "steps"):
        assert same(run.summary[key], final[key]), key
    index = load_index(learnable_shards)
    assert run.config["world_size"] == 2 and run.config["procs_per_node"] == 2
    assert run.config["classes"] == index.classes
    assert run.config["index_hash"] == index_hash(learnable_shards)
    assert run.config["optim"]["max_lr"] == 0.01 and run.config["train"]["epochs"] == 2
    assert {"git_commit", "torch", "accelerate"} <= set(run.config)
    assert run.config["precision"] == "no"  # what ran (`auto` is resolved before it is recorded)
    # media at the last step, files on disk
    media = {m["key"]: m for m in run.media}
    assert set(media) == MEDIA
    assert all(m["step"] == final["steps"] and os.path.isfile(m["path"]) for m in media.values())
    for name in ("predictions.png", "confusion.png", "lr_schedule.png", "weights.png"):
        assert (out / "plots" / name).is_file()


def test_two_process_run_logs_lineage_charts_tables_and_histograms(two_process_run,
                                                                    learnable_shards):
    out = two_process_run
    final = read_json(out / "final.json")
    run = read_offline_runs_by_id(out / "wandb", final["wandb_run_id"], wait_seconds=10)
    # metric definitions: epoch is the x-axis of val/*, val/acc max, val/loss min
    assert run.metrics["val/*"]["step_metric"] == "epoch"
    assert run.metrics["val/acc"] == {"step_metric": "epoch", "summary": ["max"]}
    assert run.metrics["val/loss"] == {"step_metric": "epoch", "summary": ["min"]}
    val = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert run.summary["val/acc"] == {"max": max(r["val/acc"] for r in val)}
    assert run.summary["val/loss"] == {"min": min(r["val/loss"] for r in val)}
    # the dataset is the run's input: a reference per shard and sidecar, index.json uploaded
    index = load_index(learnable_shards)
    (dataset,) = [a for a in run.artifacts if a["type"] == "dataset"]
    digest = index_hash(learnable_shards)
    assert dataset["use_after_commit"] and dataset["name"] == index.name
    assert dataset["aliases"] == [f"index-{digest[:12]}", "latest"]
    assert dataset["metadata"]["index_hash"] == digest
    shard_files = {s[k] for sp in index.splits.values() for s in sp.shards
                   for k in ("file", "samples_file")}
    assert set(dataset["files"]) == {"index.json"} | {f"shards/{f}" for f in shard_files}
    for name in shard_files:
        ref = dataset["files"][f"shards/{name}"]["ref"]
        assert ref == (learnable_shards / name).resolve().as_uri()
    staged = dataset["files"]["index.json"]["local_path"]
    assert open(staged, "rb").read() == (learnable_shards / "index.json").read_bytes()
    # the model: `latest` is model.safetensors, `best` the best-by-val weights
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert all(a["name"] == final["wandb_model"] == f"model-{run.run_id}" for a in models)
    by_alias = {alias: a for a in models for alias in a["aliases"]}
    assert set(by_alias) == {"latest", "best"} and len(models) == (
        1 if by_alias["latest"] is by_alias["best"] else 2)
    for alias, weights in (("latest", out / "model.safetensors"),
                           ("best", out / "checkpoints" / "best.safetensors")):
        entry = by_alias[alias]["files"]["model.safetensors"]
        assert open(entry["local_path"], "rb").read() == weights.read_bytes(), alias
    meta = by_alias["latest"]["metadata"]
    assert meta["test_acc"] == final["test_acc"] and meta["index_hash"] == digest
    assert meta["classes"] == index.classes and meta["normalization"]["scaling"] == "standardize"
    # predictions table (log.predictions rows) and the interactive confusion matrix
    assert run.charts == {"media/confusion_chart": "wandb/confusion_matrix/v1"}
    (table,) = [m["path"] for m in run.media if m["key"] == "media/prediction_table"]
    rows = read_json(table)
    assert rows["columns"] == ["sample", "image", "true", "predicted", "confidence", "correct"]
    assert len(rows["data"]) == 24
    assert all(r[5] == (r[2] == r[3]) and 0 < r[4] <= 1 for r in rows["data"])
    (chart,) = [m["path"] for m in run.media if m["key"] == "media/confusion_chart_table"]
    counts = {(a, p): n for a, p, n in read_json(chart)["data"]}
    confusion = read_json(out / "eval.json")["test"]["confusion"]
    assert sum(counts.values()) == final["test_samples"] == 40
    assert all(counts[(index.classes[i], index.classes[j])] == confusion[i][j]
               for i in range(4) for j in range(4))
    # log.histograms: every parameter and its gradient at each epoch end (steps 12 and 24)
    names = set(load_file(out / "model.safetensors")) - {
        k for k in load_file(out / "model.safetensors") if "running" in k or "batches" in k}
    for step in (12, 24):
        row = next(r for r in run.history if r["_step"] == step)
        hist = {k for k, v in row.items() if isinstance(v, dict) and v.get("_type") == "histogram"}
        assert hist == {f"{kind}/{n}" for n in names for kind in ("parameters", "gradients")}


def test_resumed_run_continues_the_same_wandb_run(learnable_shards, tiny_recipe, tmp_path,
                                                  two_process_run):
    out = tmp_path / "resumed"
    train(learnable_shards, out, tiny_recipe, "train.epochs=1", "log.wandb=true")
    first = read_json(out / "final.json")
    train(learnable_shards, out, tiny_recipe, "train.epochs=2", "log.wandb=true",
          "--resume", "auto")
    second = read_json(out / "final.json")
    assert second["wandb_run_id"] == first["wandb_run_id"] and second["steps"] == 24
    folders = find_offline_runs(out / "wandb")
    assert len(folders) == 2  # one segment per process lifetime, same id
    run = read_offline_runs_by_id(out / "wandb", first["wandb_run_id"], wait_seconds=10)
    steps = [r["_step"] for r in run.history]
    assert steps == sorted(set(steps)) and steps[0] == 2 and steps[-1] == 24
    assert 12 in steps and 14 in steps
    assert run.summary["steps"] == 24 and run.config["train"]["epochs"] == 2
    # `wandb sync` (wandb >= 0.28.1, pyproject's floor) uploads the segments one after the other
    # in start order, whatever order they are given in, and appends the second to the first
    with FakeWandbServer() as server:
        home = tmp_path / "home"
        home.mkdir()
        sync = subprocess.run([Path(sys.executable).with_name("wandb"), "sync", *folders[::-1]],
                              env={**os.environ, **server.env(home)}, capture_output=True,
                              text=True, timeout=180)
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert server.unknown == []
    assert [r["_step"] for r in server.history(first["wandb_run_id"])] == steps
    index_name = load_index(learnable_shards).name
    assert server.used == [index_name, index_name]  # the dataset, once per segment
    def versions(artifacts):
        return sorted((a["name"], a["type"], a["aliases"]) for a in artifacts)

    assert versions(server.artifacts) == versions(run.artifacts)  # every one, uploaded
    assert all(a["committed"] for a in server.artifacts)


def kill_between_checkpoints(out, proc, after: int) -> tuple[int, int]:
    """SIGKILL the job, frozen at a moment when it has logged steps past its latest checkpoint
    and is mid-epoch (12 steps an epoch); returns (last logged step, checkpoint step)."""
    wait_for_step(out, proc, after)
    while True:
        kill_tree(proc, signal.SIGSTOP)
        logged = logged_steps(out)[-1]
        ckpt = latest_checkpoint(out / "checkpoints")
        saved = load_checkpoint(ckpt)["trainer"]["step"] if ckpt else 0
        if saved < logged and logged % 12:
            break
        kill_tree(proc, signal.SIGCONT)
        wait_for_step(out, proc, logged + 1)
    kill_tree(proc)
    proc.wait()
    return logged, saved


def test_two_process_run_killed_mid_epoch_resumes_the_same_wandb_run(
        learnable_shards, tiny_recipe, tmp_path, two_process_run):
    """kill -9 between checkpoints on 2 processes, then --resume auto: one W&B run id whose two
    segments hold every step 1..24 exactly once, and bitwise the model of the uninterrupted
    two_process_run (same checkpoint_every; log_every does not change training).

    The killed job's W&B writer dies with it, losing what it had not flushed (often all of it);
    the resumed job re-sends the steps after the last one W&B holds from metrics.jsonl."""
    out = tmp_path / "resumed"
    args = ["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
            "train.epochs=2", "log.wandb=true", "log.tags=[t1,t2]", "train.log_every=1",
            "train.checkpoint_every=5"]
    logged, saved = kill_between_checkpoints(out, start(args, nproc=2), after=6)
    assert not (out / "final.json").exists()
    run_shardtrain(args + ["--resume", "auto"], nproc=2, timeout=240)
    final = read_json(out / "final.json")
    assert final["steps"] == 24 and final["world_size"] == 2
    first, second = sorted((read_offline_run(f, wait_seconds=10) for f in
                            find_offline_runs(out / "wandb")), key=lambda r: r.start_time)
    assert second.run_id == final["wandb_run_id"] and first.run_id in ("", second.run_id)
    steps1 = [r["_step"] for r in first.history]  # read one segment at a time: no merging
    steps2 = [r["_step"] for r in second.history]
    print(f"checkpoint {saved}, logged {logged}; W&B segments: {steps1} + {steps2}")
    assert steps1 == list(range(1, len(steps1) + 1)) and len(steps1) <= logged
    assert steps2 == list(range(len(steps1) + 1, 25))
    merged = read_offline_runs_by_id(out / "wandb", final["wandb_run_id"], wait_seconds=10)
    rows = {r["_step"]: r for r in merged.history}
    for record in read_jsonl(out / "metrics.jsonl"):  # the resumed job's values, every step
        for key, value in record.items():
            if key not in ("kind", "step", "epoch"):
                assert same(rows[record["step"]][key], value), (record["step"], key)
    assert merged.summary["steps"] == 24 and merged.config["train"]["epochs"] == 2
    a, b = load_file(two_process_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(two_process_run / "final.json")["test_acc"] == final["test_acc"]
    # a `compare` of two real runs: both rows, and the PNG
    png = tmp_path / "cmp.png"
    result = run_shardtrain(["compare", two_process_run, out, "--png", png])
    assert "run2" in result.stdout and "resumed" in result.stdout and png.is_file()


def test_resume_reads_metrics_up_to_a_torn_last_line(tmp_path):
    from shardtrain.tracking.report import read_metrics, truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "step": 2}\n{"kind": "st')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # killed while appending step 3
    truncate_after(path, 1)
    assert path.read_text() == '{"kind": "step", "step": 1}\n'


def test_sweep_trains_every_point_and_a_rerun_resumes_only_the_interrupted_one(
        learnable_shards, tiny_recipe, tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", "--recipe", tiny_recipe, "--data", learnable_shards, "--grid",
            "optim.max_lr=0.005,0.02", "--out", out, "--name", "lr2", "train.epochs=1",
            "train.log_every=1", "train.checkpoint_every=5"]
    first, second = out / "point-00-max_lr-0.005", out / "point-01-max_lr-0.02"
    # the sweep killed (kill -9, whole process tree) while its second point is between
    # checkpoints: the first point finished, the second has a checkpoint and no final.json
    proc = start(args, nproc=1)
    wait_for_step(second, proc, 1, timeout=240)
    logged, saved = kill_between_checkpoints(second, proc, after=6)
    done = (first / "final.json").read_bytes()
    assert not (second / "final.json").exists() and 0 < saved < logged < 12
    result = run_shardtrain(args, timeout=240)  # the same command again
    output = result.stdout + result.stderr
    assert output.count("resumed from step") == 1 and f"resumed from step {saved} " in output
    assert (first / "final.json").read_bytes() == done  # finished point: not trained again
    steps = [r["step"] for r in read_jsonl(second / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 13))
    table = (out / "compare.txt").read_text()
    assert table in result.stdout and (out / "compare.png").is_file()
    assert (out / "weights.png").is_file()
    assert first.name in table and second.name in table and "optim.max_lr" in table
    for d in (first, second):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["log"]["group"] == "lr2" and cfg["log"]["tags"] == ["sweep", "lr2"]
        assert read_json(d / "final.json")["steps"] == 12


def test_slurm_sweep_writes_the_grid_and_submits_an_array(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\necho "Submitted batch job 4242"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    result = run_shardtrain(["sweep", "--grid-file", "regularization", "--data", tmp_path,
                             "--out", tmp_path / "sw", "--slurm"])
    assert "4242" in result.stdout and "shardtrain compare" in result.stdout
    lines = [x for x in (tmp_path / "sw" / "grid.txt").read_text().splitlines()
             if not x.startswith("#")]
    assert len(lines) == 4 and all("log.group=regularization" in x for x in lines)
    args = (tmp_path / "args").read_text().split()
    assert args[0] == "--array=0-3" and args[2].endswith("slurm/sweep.sbatch")
    assert "fashion-mnist-mlp" in args and "train.epochs=10" in args


def test_grid_parsing_and_points():
    assert parse_grid_arg("model.widths=[8,16],[16,32]") == ("model.widths", ["[8,16]",
                                                                             "[16,32]"])
    points = grid_points({"a.x": ["1", "2"], "b.y": ["u", "v"]})
    assert points == [["a.x=1", "b.y=u"], ["a.x=1", "b.y=v"], ["a.x=2", "b.y=u"],
                      ["a.x=2", "b.y=v"]]
    assert point_name(3, points[3]) == "point-03-x-2-y-v"
    assert point_name(0, ["model.hidden=[]"]) == "point-00-hidden-none"
    assert point_name(1, ["model.hidden=[256,128]", "optim.max_lr=0.01"]) == (
        "point-01-hidden-256_128-max_lr-0.01")


def test_the_tutorial_studies_are_shipped():
    assert {"batch-size", "batchnorm", "depth", "dropout", "input-scaling", "learning-rate",
            "learning-rate-scaling", "lr-annealing", "optimizer", "regularization",
            "small-inputs"} <= set(list_sweeps())


@pytest.mark.parametrize("name", list_sweeps())
def test_shipped_sweeps_load_into_valid_configs(name):
    from shardtrain.config import load_config

    sweep = make_sweep("", [], name, "")
    assert sweep.recipe == "fashion-mnist-mlp" and len(grid_points(sweep.grid)) >= 2
    for point in grid_points(sweep.grid):
        cfg = load_config(sweep.recipe, point_overrides(sweep, point, "p", []) + point)
        assert cfg.log.group == name
