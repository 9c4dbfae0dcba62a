"""Two machines simulated on one host train the same weights as one machine with 2 processes.

Run: PYTHONPATH=src .venv/bin/python -m pytest -m slow tests/test_launch.py
Machine A: `accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1
--num_processes 2 ...`, machine B: the same with --machine_rank 1 (CPU, ACCELERATE_USE_CPU=1,
gloo, static rendezvous, as slurm/train.sbatch runs it); reference: one `--num_processes 2` launch.
Every process is under `timeout -s KILL`, because a rank left alone waits in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "slurm-tiny.yaml"
KILL_AFTER = 300  # seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(data: Path, out: Path, *accelerate_args: str) -> list[str]:
    return ["timeout", "-s", "KILL", str(KILL_AFTER), sys.executable, "-m",
            "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_processes", "2", *accelerate_args,
            "-m", "shardtrain", "train", "--recipe", str(RECIPE), "--data", str(data),
            "--out", str(out), "data.workers=0"]


def env() -> dict:
    e = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    e["PYTHONPATH"] = f"{ROOT / 'src'}:{e.get('PYTHONPATH', '')}".rstrip(":")
    return e


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stderr[-4000:]}"


def test_two_machines_match_one(tiny_shards, tmp_path):
    one, two = tmp_path / "one-machine", tmp_path / "two-machines"
    ref = subprocess.run(launch_cmd(tiny_shards, one, "--num_machines", "1",
                                    "--main_process_port", str(free_port())),
                         env=env(), capture_output=True, text=True)
    check(ref, "1 machine x 2 processes")

    port = str(free_port())
    machines = [subprocess.Popen(
        launch_cmd(tiny_shards, two, "--num_machines", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--rdzv_backend", "static", "--same_network"),
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, p in enumerate(machines):
        out, err = p.communicate()
        check(subprocess.CompletedProcess(p.args, p.returncode, out, err), f"machine {rank}")

    for run in (one, two):
        assert json.loads((run / "final.json").read_text())["world_size"] == 2
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
