"""Real W&B offline runs (no server) read back by wandb_offline."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from wandb_offline import (  # noqa: E402
    find_offline_runs,
    read_offline_run,
    read_offline_runs_by_id,
    read_records,
)

CONFIG = {"recipe": "r", "optim": {"max_lr": 0.01, "betas": [0.9, 0.999]}, "train": {"epochs": 3}}


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    yield tmp_path
    # wandb.init in this process started a wandb-core service and exported WANDB_SERVICE; left
    # alone, every later `shardtrain train` subprocess would join that service, where a job
    # killed with -9 leaves its run open and the resumed job is refused ("run ID ... is in use")
    wandb.teardown()


def user_keys(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def test_offline_run_round_trip_and_resume(offline_env):
    settings = wandb.Settings(init_timeout=10)
    run = wandb.init(project="proj", name="n1", config=CONFIG, group="g1", tags=["a", "b"],
                     job_type="train", dir=offline_env, settings=settings)
    run_id = run.id
    rows = [{"train/loss": 1.0 / s, "train/lr": 0.001 * s, "epoch": s} for s in range(1, 6)]
    for step, row in enumerate(rows, start=1):
        run.log(row, step=step)
    table = wandb.Table(columns=["x", "y"], data=[[1, 2], [3, 4]])
    run.log({"samples": wandb.Image(np.zeros((8, 8, 3), np.uint8)), "preds": table}, step=5)
    run.summary["best_val_acc"] = 0.93
    run.finish()

    (folder,) = find_offline_runs(offline_env)
    got = read_offline_run(folder, wait_seconds=10)
    assert (got.run_id, got.project, got.name, got.group, got.tags, got.job_type) == (
        run_id, "proj", "n1", "g1", ["a", "b"], "train")
    assert got.config == CONFIG
    assert [r["_step"] for r in got.history] == [1, 2, 3, 4, 5]
    for row, want in zip(got.history, rows):
        assert {k: row[k] for k in want} == want
    assert user_keys(got.summary)["best_val_acc"] == 0.93
    assert got.summary["train/loss"] == rows[-1]["train/loss"]
    types = {m["key"]: m["type"] for m in got.media}
    assert types == {"samples": "image-file", "preds": "table-file"}
    assert all(os.path.isfile(m["path"]) for m in got.media)
    assert got.exited

    # Offline resume: same id, a second offline-run-* folder with its own .wandb file.
    run = wandb.init(project="proj", id=run_id, resume="allow", dir=offline_env,
                     settings=settings)
    for step in range(6, 9):
        run.log({"train/loss": 1.0 / step}, step=step)
    run.finish()
    folders = find_offline_runs(offline_env)
    assert len(folders) == 2 and all((f / f"run-{run_id}.wandb").is_file() for f in folders)
    merged = read_offline_runs_by_id(offline_env, run_id, wait_seconds=10)
    assert [r["_step"] for r in merged.history] == list(range(1, 9))
    assert merged.config == CONFIG and merged.group == "g1" and merged.tags == ["a", "b"]
    assert merged.summary["train/loss"] == 1.0 / 8 and merged.summary["best_val_acc"] == 0.93
    assert merged.paths == folders


def test_torn_tail_is_dropped(offline_env):
    # dir= explicitly: wandb's in-process settings singleton keeps an earlier test's WANDB_DIR
    run = wandb.init(project="proj", config={"a": 1}, dir=offline_env)
    for step in range(1, 4):
        run.log({"x": step}, step=step)
    run.finish()
    (folder,) = find_offline_runs(offline_env)
    (path,) = folder.glob("run-*.wandb")
    assert read_offline_run(folder, wait_seconds=10).exited
    full = read_records(path)
    path.write_bytes(path.read_bytes()[:-5])
    assert 0 < len(read_records(path)) < len(full)


ACCELERATE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, wandb
    from accelerate import Accelerator
    acc = Accelerator(log_with="wandb", cpu=True)
    acc.init_trackers("proj", config={"optim": {"max_lr": 0.02}, "seed": 1},
                      init_kwargs={"wandb": {"group": "gA", "tags": ["acc"], "name": "via-acc",
                                             "settings": wandb.Settings(init_timeout=10)}})
    for step in range(1, 4):
        acc.log({"train/loss": 1.0 / step}, step=step)
    run = acc.get_tracker("wandb", unwrap=True)  # the wandb Run (None off the main process)
    if acc.is_main_process:
        run.log({"grid": wandb.Image(np.zeros((8, 8, 3), np.uint8), caption="preds"),
                 "table": wandb.Table(columns=["k", "v"], data=[["a", 1]])}, step=3)
    acc.get_tracker("wandb").log_images({"imgs": [np.zeros((8, 8, 3), np.uint8)]}, step=3)
    acc.wait_for_everyone()
    acc.end_training()
    print(run.id)
""")


def test_accelerate_tracker_run_reads_back(offline_env):
    out = subprocess.run([sys.executable, "-c", ACCELERATE_SCRIPT], env=dict(os.environ),
                         capture_output=True, text=True, timeout=120, check=True)
    run_id = out.stdout.strip().splitlines()[-1]
    got = read_offline_runs_by_id(offline_env, run_id, wait_seconds=10)
    assert got.project == "proj" and got.group == "gA" and got.tags == ["acc"]
    assert got.config == {"optim": {"max_lr": 0.02}, "seed": 1}
    assert [r["_step"] for r in got.history] == [1, 2, 3]
    types = {m["key"]: m["type"] for m in got.media}
    assert types == {"grid": "image-file", "table": "table-file", "imgs": "images/separated"}
