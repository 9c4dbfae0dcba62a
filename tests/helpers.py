"""Run shardtrain as a user would: a plain process or a real `accelerate launch` on CPU; start a
run in the background, watch its progress, and signal it at a known step."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# Timeout of a test that runs shardtrain in subprocesses (pyproject's default, 120 s, is for
# in-process tests): each subprocess has its own `timeout -s KILL`, this bounds the whole test.
RUNS = pytest.mark.timeout(900)

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
EMULATE = str(Path(__file__).with_name("emulate.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, emulate: list[str] | None = None) -> list[str]:
    """2+ real CPU processes (launch/README.md: `--cpu --num_processes 2` silently starts one).
    With `emulate` (options of tests/emulate.py) the command runs through that harness."""
    entry = ["-m", "shardtrain"] if emulate is None else [EMULATE, *emulate, "--"]
    if nproc == 1:
        return [sys.executable, *entry]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *entry]


def shardtrain_env(nproc: int, env: dict | None = None) -> dict:
    """Offline W&B, real CPU processes, and a fixed thread count (float sums depend on it).

    WANDB_SERVICE is dropped: a wandb.init in the pytest process exports it, and a job joining
    that long-lived wandb-core would find the run of a job killed earlier still open there."""
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**inherited, "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1" if nproc > 1 else "2", **(env or {})}


def run_shardtrain(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None,
                   check: bool = True, cwd: Path | None = None,
                   emulate: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = shardtrain_env(nproc, env)
    cmd = (["timeout", "-s", "KILL", str(timeout)] + launch_cmd(nproc, emulate)
           + [str(a) for a in args])
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def start(args: list, nproc: int, env: dict | None = None) -> subprocess.Popen:
    """A training job in the background (stop it with kill_tree)."""
    return subprocess.Popen(launch_cmd(nproc) + [str(a) for a in args],
                            env=shardtrain_env(nproc, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """Signal the launcher and every descendant: torch elastic starts its workers in their own
    sessions, so killing the launcher's process group would leave them training as orphans."""
    try:
        victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for pid in victims:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def logged_steps(out: Path) -> list[int]:
    """Optimizer steps in RUN_DIR/metrics.jsonl, complete lines only (it may be mid-write)."""
    path = Path(out) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()[: text.count("\n")]
    return [r["step"] for r in map(json.loads, filter(None, lines)) if r["kind"] == "step"]


def wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until `step` is logged; return the last logged step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = logged_steps(out)
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"exited early {proc.returncode}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    kill_tree(proc)
    raise AssertionError("timed out waiting for training progress")


def signal_at_known_step(out: Path, proc: subprocess.Popen, sig: int, after: int,
                         every: int = 1) -> int:
    """Send `sig` to the whole job while it is frozen, so the step that handles it is known.

    With train.log_every=1, step k is logged only after the job checked for a signal at step k;
    so a job frozen (SIGSTOP) with k logged checks next after step k + 1 (1 process) or at the
    next multiple of Preemption.CHECK_EVERY = `every` (several processes). Returns that step.
    With several processes a freeze at k + 1 = that multiple may have caught rank 0 inside the
    agreement, its "no signal" already sent: then thaw and freeze again.
    """
    wait_for_step(out, proc, after)
    while True:
        kill_tree(proc, signal.SIGSTOP)
        last = logged_steps(out)[-1]
        expected = (last // every + 1) * every
        if every == 1 or expected > last + 1:
            break
        kill_tree(proc, signal.SIGCONT)
        wait_for_step(out, proc, last + 1)
    kill_tree(proc, sig)
    kill_tree(proc, signal.SIGCONT)
    return expected
