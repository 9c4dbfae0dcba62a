"""Failures that end fast and say why in one line: a rank that dies or hits a bug, a second writer
on a run folder, a full disk while checkpointing, a user error under the launchers.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_failfast.py
Multi-process runs use `python -m shardtrain.launch accelerate` (what launch/train.sh and
slurm/train.sbatch run) on CPU; two "machines" are two launchers on this host. Every process is
under `timeout -s KILL`: a regression shows as a wrong exit code, not as a hung suite.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import RUNS, free_port, shardtrain_env
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint
from shardtrain.errors import ExitCode

pytestmark = RUNS  # real training subprocesses

ROOT = Path(__file__).resolve().parents[1]
INJECT = ROOT / "tests" / "inject.py"
KILL_AFTER = "240"
# 12 steps per epoch on learnable_shards; long enough to be killed mid-run
LONG = ["train.epochs=30", "train.checkpoint_every=4", "train.log_every=1", "log.plots=false",
        "train.dist_timeout=300"]


def launcher(nproc: int, *extra: str) -> list[str]:
    return ["timeout", "-s", "KILL", KILL_AFTER, sys.executable, "-m", "shardtrain.launch",
            "accelerate", "--multi_gpu", "--num_processes", str(nproc), "--mixed_precision", "no",
            "--dynamo_backend", "no", *extra]


def one_machine(nproc: int, script: list[str]) -> list[str]:
    if nproc == 1:  # accelerate's --multi_gpu needs 2; one process is a plain run
        return ["timeout", "-s", "KILL", KILL_AFTER, sys.executable, *script]
    return launcher(nproc, "--num_machines", "1", "--main_process_port", str(free_port()),
                    *script)


def machine(rank: int, port: int, script: list[str]) -> list[str]:
    """Machine `rank` of 2 (1 process each), as slurm/train.sbatch starts one per node."""
    return launcher(2, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                    "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
                    "--same_network", *script)


def train_script(data, out, recipe, *extra, fault: str = "") -> list[str]:
    head = [str(INJECT), fault] if fault else ["-m", "shardtrain"]
    return [*head, "train", "--recipe", str(recipe), "--data", str(data), "--out", str(out),
            *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=shardtrain_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=shardtrain_env(2), capture_output=True, text=True)


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_checkpoint(out: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint(out / "checkpoints") is None:
        for p in procs:
            assert p.poll() is None, f"exited {p.returncode}: {p.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def error_lines(stderr: str) -> list[str]:
    """stderr without the launchers' start-up chatter (accelerate/torchrun warnings)."""
    return [line for line in stderr.splitlines() if line.startswith("shardtrain")]


def assert_all_gone(processes: list[psutil.Process]) -> None:
    """Every process of the job, loader workers included, has ended (none lingers polling)."""
    gone, alive = psutil.wait_procs(processes, timeout=15)
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]


# ---- a rank that dies or fails ------------------------------------------------------------------
def test_a_dead_machine_ends_the_other_at_once_with_one_line(learnable_shards, tiny_recipe,
                                                             tmp_path):
    """kill -9 of machine 1's processes (its agent, trainer and loader workers), as the OOM
    killer or a lost node would: machine 0 exits 4 with one line naming rank 1, instead of
    waiting train.dist_timeout in a collective; the checkpoint it leaves loads."""
    out, port = tmp_path / "run", free_port()
    script = train_script(learnable_shards, out, tiny_recipe, *LONG, "data.workers=2")
    machines = [start(machine(rank, port, script)) for rank in (0, 1)]
    wait_for_checkpoint(out, machines)
    survivor = tree(machines[0])
    victims = tree(machines[1])
    for p in victims:
        p.kill()
    killed = time.monotonic()
    assert machines[0].wait(timeout=120) == ExitCode.PEER_FAILED, machines[0].stderr.read()
    print(f"surviving machine exited {time.monotonic() - killed:.1f} s after the kill")
    lines = error_lines(machines[0].stderr.read())
    assert len(lines) == 1, lines
    assert lines[0].startswith("shardtrain: error: rank 1 (pid ") and "died" in lines[0], lines
    assert int(lines[0].split("(pid ")[1].split()[0]) in {p.pid for p in victims}
    assert "--resume auto" in lines[0]
    assert_all_gone(survivor)
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["trainer"]["step"] >= 4


def test_a_silent_machine_is_declared_dead_after_the_peer_timeout(learnable_shards, tiny_recipe,
                                                                  tmp_path):
    """SIGSTOP of machine 1's trainer (a partition or a hung node: its sockets stay open, but it
    says nothing): machine 0 gives up after train.peer_timeout, not train.dist_timeout."""
    out, port = tmp_path / "run", free_port()
    script = train_script(learnable_shards, out, tiny_recipe, *LONG, "train.peer_timeout=10")
    machines = [start(machine(rank, port, script)) for rank in (0, 1)]
    try:
        wait_for_checkpoint(out, machines)
        frozen = tree(machines[1])[-1]  # launcher -> agent -> trainer
        frozen.suspend()
        assert machines[0].wait(timeout=120) == ExitCode.PEER_FAILED, machines[0].stderr.read()
        lines = error_lines(machines[0].stderr.read())
        assert lines == [f"shardtrain: error: rank 1 (pid {frozen.pid} on {socket.gethostname()}"
                         f") died (no heartbeat for 10 s): stopping every rank; run the job again "
                         f"with the same --out and --resume auto to continue from its last "
                         f"checkpoint"], lines
    finally:
        for p in tree(machines[1]):
            p.kill()


def test_a_bug_on_one_rank_ends_every_rank_within_seconds(learnable_shards, tiny_recipe,
                                                          tmp_path):
    """Rank 1 raises in its 7th step with loader workers running: its traceback is printed,
    rank 0 prints one line naming it, both exit 1 and nothing is left running."""
    out = tmp_path / "run"
    proc = start(one_machine(2, train_script(learnable_shards, out, tiny_recipe, *LONG,
                                             "data.workers=2", fault="crash:1:7")))
    seen: dict[int, psutil.Process] = {}
    while proc.poll() is None:  # remember every process of the job, loader workers included
        seen.update({p.pid: p for p in tree(proc)})
        time.sleep(0.1)
    stderr = proc.stderr.read()
    assert proc.returncode == 1, stderr[-3000:]
    assert "RuntimeError: injected bug on rank 1" in stderr  # the bug keeps its traceback
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("shardtrain: rank 1 (pid "), lines
    assert lines[0].endswith("crashed: RuntimeError: injected bug on rank 1"), lines
    assert len(seen) >= 5, "expected launcher, agent, 2 trainers and loader workers"
    assert_all_gone(list(seen.values()))


def test_a_user_error_after_start_up_is_one_line_for_the_whole_job(learnable_shards,
                                                                   tiny_recipe, tmp_path):
    """Every rank raises the same error once the process group exists: one line, exit 2."""
    r = run(one_machine(2, train_script(learnable_shards, tmp_path / "run", tiny_recipe,
                                        "data.batch_size=15")))
    assert r.returncode == ExitCode.USAGE, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "batch" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr


@pytest.mark.parametrize("launch", ["accelerate", "torchrun", "train.sh"])
def test_a_config_mistake_is_one_line_under_every_launcher(launch, tiny_shards, tiny_recipe):
    args = ["train", "--recipe", str(tiny_recipe), "--data", str(tiny_shards), "optim.max_lrr=1"]
    cmd = {"accelerate": one_machine(2, ["-m", "shardtrain", *args]),
           "torchrun": [sys.executable, "-m", "shardtrain.launch", "torchrun", "--nproc_per_node",
                        "2", "--master_port", str(free_port()), "-m", "shardtrain", *args],
           "train.sh": [str(ROOT / "launch" / "train.sh"), str(tiny_recipe), str(tiny_shards),
                        "optim.max_lrr=1"]}[launch]
    env = {"SHARDTRAIN_PYTHON": sys.executable, "SHARDTRAIN_PORT": str(free_port())}
    r = subprocess.run(cmd, env=shardtrain_env(2, env), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == ExitCode.USAGE, r.stderr[-3000:]
    assert error_lines(r.stderr) == [
        "shardtrain: error: unknown config key 'optim.max_lrr' (did you mean 'optim.max_lr'?)"]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert "failed (exitcode" not in r.stderr  # the elastic agent's own ERROR log of the failure


# ---- one writer per run folder ------------------------------------------------------------------
HOLD = ("import sys, time; from pathlib import Path; from shardtrain.runlock import "
        "lock_run_folder; lock_run_folder(Path(sys.argv[1])); print('locked', flush=True); "
        "time.sleep(120)")


def hold_lock(folder: Path, job: str, restart: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SLURM_JOB_ID": job,
           "SLURM_RESTART_COUNT": str(restart)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, monkeypatch):
    from shardtrain.errors import UserError
    from shardtrain.runlock import LOCK_NAME, lock_run_folder

    holder = hold_lock(tmp_path / "run", job="4711")
    monkeypatch.setenv("SLURM_JOB_ID", "4712")
    try:
        with pytest.raises(UserError) as refused:
            lock_run_folder(tmp_path / "run")
        message = str(refused.value)
        assert f"pid {holder.pid} on " in message and "SLURM job 4711" in message, message
        assert "\n" not in message and LOCK_NAME in message
    finally:
        holder.kill()
        holder.wait()
    lock = lock_run_folder(tmp_path / "run")  # the dead holder's lock is taken over at once
    assert f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_NAME).read_text()
    lock.release()


def test_a_requeued_job_waits_for_its_previous_incarnation(tmp_path, monkeypatch):
    """Same SLURM job, higher restart count: the holder is this job's dying predecessor (e.g.
    an NFS lease not yet expired), so the lock is awaited instead of refused."""
    from shardtrain.runlock import lock_run_folder

    holder = hold_lock(tmp_path / "run", job="4711", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    killer = subprocess.Popen(["sh", "-c", f"sleep 3; kill -9 {holder.pid}"])
    try:
        lock_run_folder(tmp_path / "run", wait_for_predecessor=60).release()
    finally:
        killer.wait()
        holder.kill()
        holder.wait()


def test_training_into_a_folder_in_use_is_refused_on_every_rank(learnable_shards, tiny_recipe,
                                                                 tmp_path):
    """A double submission: the second job (2 processes) exits 2 at start-up, one line naming
    the first; the first is undisturbed."""
    out = tmp_path / "run"
    first = start(one_machine(1, train_script(learnable_shards, out, tiny_recipe, *LONG)))
    try:
        wait_for_checkpoint(out, [first])
        second = run(one_machine(2, train_script(learnable_shards, out, tiny_recipe, *LONG,
                                                 "--resume", "auto")))
        assert second.returncode == ExitCode.USAGE, second.stderr[-3000:]
        lines = error_lines(second.stderr)
        holder = tree(first)[-1]  # launcher -> agent -> trainer
        assert len(lines) == 1 and f"is in use by pid {holder.pid} on " in lines[0], lines
        assert first.poll() is None  # the first run goes on
    finally:
        for p in tree(first):
            p.kill()


# ---- a full disk while checkpointing ------------------------------------------------------------
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(learnable_shards,
                                                                     tiny_recipe, tmp_path):
    """The 2nd checkpoint write fails as on a full disk (injected at torch.save) on a
    2-process run: exit 1 on every rank, one line naming the checkpoint, no partial files, and
    the previous checkpoint is what `latest` names and loads."""
    out = tmp_path / "run"
    r = run(one_machine(2, train_script(learnable_shards, out, tiny_recipe, *LONG,
                                        fault="enospc:2")))
    assert r.returncode == ExitCode.DATA_ERROR, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    ckpts = out / "checkpoints"
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"shardtrain: error: could not write {ckpts / 'step-000008'}: ")
    assert f"the previous checkpoint {ckpts / 'step-000004'} is intact" in lines[0]
    assert load_checkpoint(latest_checkpoint(ckpts))["trainer"]["step"] == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000004"]


def mount_works(path: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                            f"{path}"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk(learnable_shards, tiny_recipe, tmp_path):
    """The same on a real 1000 KiB tmpfs (a private mount namespace; needs CAP_SYS_ADMIN):
    each checkpoint is ~420 KB, so the 3rd does not fit. After the disk is grown, --resume auto
    finishes the run from the intact checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount_works(disk):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    train = (f"{sys.executable} -m shardtrain train --recipe {tiny_recipe} --data "
             f"{learnable_shards} --out {disk}/run train.checkpoint_every=2 train.max_steps=8 "
             f"log.plots=false log.wandb=false")
    script = (f"mount -t tmpfs -o size=1000k tmpfs {disk} && {train}; echo rc=$?; "
              f"cat {disk}/run/checkpoints/latest; echo; mount -o remount,size=16m {disk} && "
              f"{train} --resume auto && cat {disk}/run/final.json")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], env=shardtrain_env(1),
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    print("\n".join(error_lines(r.stderr)))
    assert "rc=1" in r.stdout and "step-000004\n" in r.stdout, out[-3000:]
    assert f"could not write {disk}/run/checkpoints/step-000006: " in out
    assert "the previous checkpoint" in out and '"steps": 8' in r.stdout, out[-3000:]


def test_signals_are_named_by_the_launch_wrapper(capsys):
    """A worker killed by a signal could not say anything: the wrapper names it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from shardtrain.launch import report

    killed = ProcessFailure(local_rank=0, pid=4242, exitcode=-signal.SIGKILL, error_file="")
    assert report(ChildFailedError("shardtrain", {1: killed})) == 128 + signal.SIGKILL
    out, err = capsys.readouterr()
    assert err == f"shardtrain: rank 1 (pid 4242 on {socket.gethostname()}) was killed by " \
                  "SIGKILL (out of memory?)\n"
    preempted = ProcessFailure(local_rank=0, pid=4243, exitcode=75, error_file="")
    assert report(ChildFailedError("shardtrain", {0: preempted})) == 75
    assert capsys.readouterr().err == ""  # a worker with an exit code spoke for itself
