"""Real SLURM jobs on the local 2-node cluster: slurm/train.sbatch, preemption + requeue, a node
killed mid-run (+ requeue and resume), one srun task per rank, sweeps.

Run: `make test-slurm` (starts the cluster with slurm/cluster/start.sh, runs
`pytest -m slurm tests/test_slurm.py`, stops it). Fails with a one-line reason when `sinfo` is
missing or no cluster answers: a green run always means real jobs ran. There is no
accounting DB: jobs are polled with `scontrol show job` under a deadline, and any job still alive
when a test ends is cancelled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "slurm-tiny.yaml"
LOCAL_CONF = Path("/tmp/shardtrain-slurm/etc/slurm.conf")  # written by slurm/cluster/start.sh
# long enough (60 epochs x 3 steps) that a signal after the first checkpoint arrives mid-run
OVERRIDES = ["train.epochs=60"]
JOB_TIMEOUT = 300  # seconds per job, requeue included
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def slurm_env() -> dict:
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT / 'src'}:{env.get('PYTHONPATH', '')}".rstrip(":")
    env["SHARDTRAIN_PYTHON"] = sys.executable
    env["SHARDTRAIN_ROOT"] = str(ROOT)
    env["WANDB_MODE"] = "disabled"
    return env


def cluster_problem() -> str:
    if not shutil.which("sinfo"):
        return "sinfo not found (apt-get install slurm-wlm, then bash slurm/cluster/start.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=slurm_env(), capture_output=True,
                           text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answering (bash slurm/cluster/start.sh)"
    if r.returncode != 0 or not r.stdout.strip():
        return f"no SLURM cluster answering (bash slurm/cluster/start.sh): {r.stderr.strip()[:200]}"
    if not {"idle", "mixed", "allocated"} & set(r.stdout.split()):
        return f"no usable SLURM node: {r.stdout.split()}"
    return ""


pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]  # jobs of <= 5 min each


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """Fail clearly if no cluster answers (these tests run only when selected with -m slurm;
    `make test-slurm` starts and stops the local cluster around them)."""
    problem = cluster_problem()
    if problem:
        pytest.fail(f"{problem}; start it with `bash slurm/cluster/start.sh` or `make test-slurm`")


# ---- helpers ------------------------------------------------------------------------------
def sbatch(args: list[str], tmp: Path) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={tmp}", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=slurm_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_records(job: str) -> list[dict]:
    """`scontrol show job -o` as dicts, one per job (or array task)."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm_env(),
                       capture_output=True, text=True, timeout=30)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in r.stdout.splitlines() if line]


def scancel(job: str, *args: str) -> None:
    subprocess.run(["scancel", *args, job], env=slurm_env(), capture_output=True, timeout=30)


def wait_done(job: str, timeout: float = JOB_TIMEOUT, log: Path | None = None) -> list[dict]:
    """Poll until every task of `job` is terminal; cancel it and fail on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(job)
        if records and all(r.get("JobState") in TERMINAL for r in records):
            return records
        time.sleep(1)
    scancel(job)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"job {job} not finished after {timeout}s: {job_records(job)}\n{tail}")


class Jobs:
    """Submitted job ids; whatever is still alive at teardown is cancelled."""

    def __init__(self):
        self.ids: list[str] = []

    def submit(self, args: list[str], tmp: Path) -> str:
        self.ids.append(sbatch(args, tmp))
        return self.ids[-1]

    def cancel_all(self):
        for job in self.ids:
            if any(r.get("JobState") not in TERMINAL for r in job_records(job)):
                scancel(job)


@pytest.fixture(scope="module")
def jobs(slurm_cluster):
    j = Jobs()
    yield j
    j.cancel_all()


def train_args(data: Path, out: Path) -> list[str]:
    return ["--recipe", str(RECIPE), "--data", str(data), "--out", str(out), *OVERRIDES]


def assert_completed(records: list[dict], log: Path) -> None:
    text = log.read_text() if log.exists() else "(no log)"
    for r in records:
        assert r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0", f"{r}\n{text[-4000:]}"


def step_processes(job: str, node: str) -> list[psutil.Process]:
    """The processes of `job`'s steps on virtual node `node` (n1, n2): every node runs on this
    host, so they are told apart by their environment (the batch shell has no SLURM_STEP_ID)."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node \
                and "SLURM_STEP_ID" in env:
            found.append(p)
    return found


def wait_for_checkpoint(run: Path, job: str) -> None:
    """Until the run's first checkpoint exists (the job is then mid-run)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list(run.glob("checkpoints/step-*/trainer.json")):
        state = (job_records(job) or [{}])[0].get("JobState")
        assert state not in TERMINAL, f"job ended before its checkpoint: {state}"
        if time.monotonic() > deadline:
            scancel(job)
            pytest.fail("no checkpoint before the deadline")
        time.sleep(0.2)


def split_count(shards: Path, split: str) -> int:
    index = json.loads((shards / "index.json").read_text())
    return index["splits"][split]["num_samples"] if split in index["splits"] else 0


# ---- tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_node_run(tiny_shards, tmp_path_factory, jobs):
    """One uninterrupted 2-node run: (final.json, log text); also the reference step count."""
    tmp = tmp_path_factory.mktemp("slurm2n")
    job = jobs.submit(["--nodes=2", "-o", "slurm-%j.out", "slurm/train.sbatch",
                       *train_args(tiny_shards, tmp / "run")], tmp)
    log = tmp / f"slurm-{job}.out"
    assert_completed(wait_done(job, log=log), log)
    return json.loads((tmp / "run" / "final.json").read_text()), log.read_text()


def test_two_nodes_complete(two_node_run, tiny_shards):
    final, log = two_node_run
    print(re.search(r"shardtrain topology: .*", log).group(0))
    print("final.json:", json.dumps(final))
    assert "shardtrain topology: nodes=2 procs_per_node=1 world_size=2 main=n1:" in log
    assert final["world_size"] == 2
    assert final["val_samples"] == split_count(tiny_shards, "val")  # every sample exactly once
    assert final.get("test_samples", 0) == split_count(tiny_shards, "test")
    assert final["steps"] > 0


def test_preemption_requeues_and_resumes(two_node_run, tiny_shards, tmp_path, jobs):
    run = tmp_path / "run"
    job = jobs.submit(["--nodes=2", "-o", "slurm-%j.out", "slurm/train.sbatch",
                       *train_args(tiny_shards, run)], tmp_path)
    log = tmp_path / f"slurm-{job}.out"
    wait_for_checkpoint(run, job)
    scancel(job, "--signal=USR1", "--batch")
    records = wait_done(job, log=log)
    assert_completed(records, log)
    text = log.read_text()
    restarts = int(records[0]["Restarts"])
    final = json.loads((run / "final.json").read_text())
    print(f"requeue: scontrol Restarts={restarts}")
    events = r"shardtrain(?: topology| node|: got|: training|: preempted).*"
    print("\n".join(re.findall(events, text)))
    print("final.json:", json.dumps(final))
    assert restarts >= 1, text[-4000:]
    assert "preempted with a checkpoint; requeueing" in text
    assert "restart=1" in text
    reference = two_node_run[0]
    assert final["steps"] == reference["steps"]  # exact step count across the resume
    assert final["val_loss"] == reference["val_loss"]  # and the same weights (CPU is deterministic)
    assert final["world_size"] == 2
    assert final["val_samples"] == split_count(tiny_shards, "val")


def test_failed_job_keeps_the_trainer_exit_code_and_is_not_requeued(tiny_shards, tmp_path, jobs):
    """A user error on both nodes: the job fails with the trainer's code 2 (not the launcher's
    1, not 75), names the mistake, and is not requeued."""
    job = jobs.submit(["--nodes=2", "-o", "slurm-%j.out", "slurm/train.sbatch",
                       *train_args(tiny_shards, tmp_path / "run"), "optim.max_lrr=0.1"], tmp_path)
    log = tmp_path / f"slurm-{job}.out"
    record = wait_done(job, log=log)[0]
    text = log.read_text()
    print(f"JobState={record['JobState']} ExitCode={record['ExitCode']} "
          f"Restarts={record['Restarts']}")
    print("\n".join(re.findall(r"shardtrain(?: node|: training|: a node).*", text)))
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0"), text[-3000:]
    assert record["Restarts"] == "0" and "requeueing job" not in text
    assert "did you mean 'optim.max_lr'" in text


def test_a_killed_node_ends_the_job_fast_then_it_requeues_and_resumes(two_node_run, tiny_shards,
                                                                        tmp_path, jobs):
    """kill -9 of every process of the job on n2 (node shell, agent, trainer, loader workers) as
    the OOM killer or a lost node would do: the trainer on n1 ends within seconds with one line
    naming rank 1 on n2, instead of waiting train.dist_timeout in a collective; the job requeues
    itself (a node failure, SHARDTRAIN_MAX_REQUEUES) and resumes from the last checkpoint to the
    same result as an uninterrupted run."""
    run = tmp_path / "run"
    job = jobs.submit(["--nodes=2", "-o", "slurm-%j.out", "slurm/train.sbatch",
                       *train_args(tiny_shards, run)], tmp_path)
    log = tmp_path / f"slurm-{job}.out"
    wait_for_checkpoint(run, job)
    victims, survivors = step_processes(job, "n2"), step_processes(job, "n1")
    assert any("shardtrain" in " ".join(p.cmdline()) for p in victims), victims
    for p in victims:
        p.kill()
    killed = time.monotonic()
    _, alive = psutil.wait_procs(survivors, timeout=120)
    survivor_exit = time.monotonic() - killed
    assert not alive, f"n1 still running 120 s after n2 was killed: {alive}"
    records = wait_done(job, log=log)
    assert_completed(records, log)
    text = log.read_text()
    died = re.findall(r"shardtrain: error: rank \d+ \(pid (\d+) on (\w+)\) died.*", text)
    print(f"n1's step processes all ended {survivor_exit:.1f} s after n2's were killed")
    print("\n".join(re.findall(r"shardtrain(?: topology| node|: error|: training|: node).*", text)))
    print(f"requeues.log: {(run / 'requeues.log').read_text().strip()}")
    assert len(died) == 1 and died[0][1] == "n2", text[-4000:]
    assert int(died[0][0]) in {p.pid for p in victims}
    assert "node failure; requeueing job" in text and int(records[0]["Restarts"]) >= 1
    assert re.search(rf"job={job} restart=0 node failure \(exit \d+\): requeued",
                     (run / "requeues.log").read_text())
    final, reference = json.loads((run / "final.json").read_text()), two_node_run[0]
    assert final["steps"] == reference["steps"] and final["world_size"] == 2
    assert final["val_loss"] == reference["val_loss"]  # resumed bitwise from the checkpoint


def test_node_failures_past_the_bound_fail_the_job_and_a_resubmission_resumes(
        two_node_run, tiny_shards, tmp_path, jobs):
    """SHARDTRAIN_MAX_REQUEUES=0: the node failure ends the job with exit 4 (no requeue), and
    submitting it again with the same --out resumes it from the last checkpoint."""
    run = tmp_path / "run"
    env = {**slurm_env(), "SHARDTRAIN_MAX_REQUEUES": "0"}
    r = subprocess.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--nodes=2", "-o",
                        "slurm-%j.out", "slurm/train.sbatch", *train_args(tiny_shards, run)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    job = r.stdout.strip().split(";")[0]
    jobs.ids.append(job)
    log = tmp_path / f"slurm-{job}.out"
    wait_for_checkpoint(run, job)
    for p in step_processes(job, "n1"):  # this time rank 0's node: the hub and the store
        p.kill()
    record = wait_done(job, log=log)[0]
    text = log.read_text()
    print(f"JobState={record['JobState']} ExitCode={record['ExitCode']} "
          f"Restarts={record['Restarts']}")
    print("\n".join(re.findall(r"shardtrain(?: node|: error|: training|: node).*", text)))
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "4:0", "0")
    assert re.search(r"shardtrain: error: rank 0 \(pid \d+ on n1\) died", text), text[-3000:]
    assert "not requeueing: 0 node-failure requeues already" in text
    again = jobs.submit(["--nodes=2", "-o", "slurm-%j.out", "slurm/train.sbatch",
                         *train_args(tiny_shards, run)], tmp_path)
    log = tmp_path / f"slurm-{again}.out"
    assert_completed(wait_done(again, log=log), log)
    final = json.loads((run / "final.json").read_text())
    assert "resumed from step" in log.read_text()
    assert final["steps"] == two_node_run[0]["steps"]
    assert final["val_loss"] == two_node_run[0]["val_loss"]


def test_srun_one_task_per_rank_is_one_job(tiny_shards, tmp_path, jobs):
    """`srun --ntasks-per-node=2 python -m shardtrain train` on 2 nodes (Lightning/submitit
    style, no launcher): the 4 tasks derive their ranks from SLURM and train ONE world-size-4
    run, not 4 world-size-1 runs into one folder."""
    script = tmp_path / "per-task.sbatch"
    script.write_text(f"#!/bin/bash\nsrun {sys.executable} -m shardtrain train --recipe {RECIPE} "
                      f"--data {tiny_shards} --out {tmp_path / 'run'} train.epochs=2\n")
    job = jobs.submit(["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "-o",
                       "slurm-%j.out", str(script)], tmp_path)
    log = tmp_path / f"slurm-{job}.out"
    assert_completed(wait_done(job, log=log), log)
    text = log.read_text()
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    print(re.search(r"srun topology: .*", text).group(0))
    print("final.json:", json.dumps(final))
    assert re.search(r"srun topology: rank 0 of 4 \(local 0 of 2, 2 nodes\), rendezvous n1:\d+",
                     text), text[-3000:]
    assert text.count("done: ") == 1 and final["world_size"] == 4 and final["ranks_identical"]
    assert final["val_samples"] == split_count(tiny_shards, "val")


def test_sweep_array(tiny_shards, tmp_path, jobs):
    grid = tmp_path / "grid.txt"
    grid.write_text("# lr grid\noptim.max_lr=0.005\n\noptim.max_lr=0.02 optim.weight_decay=0\n")
    sweep = tmp_path / "sweep"
    job = jobs.submit(["--array=0-1", "-o", "slurm-%A_%a.out", "slurm/sweep.sbatch", str(grid),
                       str(sweep), "--recipe", str(RECIPE), "--data", str(tiny_shards)], tmp_path)
    records = wait_done(job)
    logs = sorted(tmp_path.glob(f"slurm-{job}_*.out"))
    assert len(records) == 2, records
    assert_completed(records, logs[0] if logs else tmp_path / "none")
    for i, lr in enumerate([0.005, 0.02]):
        final = json.loads((sweep / f"point-{i}" / "final.json").read_text())
        config = (sweep / f"point-{i}" / "config.yaml").read_text()
        assert final["world_size"] == 1
        assert re.search(rf"max_lr: {lr}\b", config), config
