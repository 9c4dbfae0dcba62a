"""Run shardtrain as a user would: a plain process or a real `accelerate launch` on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    """Offline W&B, real CPU processes, and a fixed thread count (float sums depend on it)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "offline",
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
