"""Every launcher trains the same weights at the same world size: two machines simulated on one
host, and torchrun (one node, and two), against one `accelerate launch --num_processes 2`.

Run: PYTHONPATH=src .venv/bin/python -m pytest -m slow tests/test_launch.py
Machine A: `accelerate launch --num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1
--num_processes 2 ...`, machine B: the same with --machine_rank 1 (CPU, ACCELERATE_USE_CPU=1,
gloo, static rendezvous, as slurm/train.sbatch runs it); torchrun: `torchrun --nproc_per_node 2
-m shardtrain train ...` and `torchrun --nnodes 2 --node_rank 0|1 --master_addr ...`.
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # 3 launches of <= 5 min

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


TRAIN = ["-m", "shardtrain", "train", "--recipe", str(RECIPE)]


def torchrun_cmd(data: Path, out: Path, *torchrun_args: str) -> list[str]:
    return ["timeout", "-s", "KILL", str(KILL_AFTER), sys.executable, "-m",
            "torch.distributed.run", *torchrun_args, *TRAIN, "--data", str(data), "--out",
            str(out), "data.workers=0"]


def same_weights(a: Path, b: Path) -> None:
    for run in (a, b):
        assert json.loads((run / "final.json").read_text())["world_size"] == 2
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 0
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def run_machines(commands: list[list[str]]) -> None:
    """Start every machine's command at once, wait for all of them."""
    procs = [subprocess.Popen(c, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for rank, p in enumerate(procs):
        out, err = p.communicate()
        check(subprocess.CompletedProcess(p.args, p.returncode, out, err), f"machine {rank}")


@pytest.fixture(scope="module")
def one_machine_run(tiny_shards, tmp_path_factory) -> Path:
    """The reference: one `accelerate launch` of 2 processes."""
    one = tmp_path_factory.mktemp("one-machine") / "run"
    ref = subprocess.run(launch_cmd(tiny_shards, one, "--num_machines", "1",
                                    "--main_process_port", str(free_port())),
                         env=env(), capture_output=True, text=True)
    check(ref, "1 machine x 2 processes")
    return one


def test_two_machines_match_one(one_machine_run, tiny_shards, tmp_path):
    two, port = tmp_path / "two-machines", str(free_port())
    run_machines([launch_cmd(tiny_shards, two, "--num_machines", "2", "--machine_rank", str(rank),
                             "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                             "--rdzv_backend", "static", "--same_network") for rank in (0, 1)])
    same_weights(one_machine_run, two)


def test_torchrun_matches_accelerate_launch(one_machine_run, tiny_shards, tmp_path):
    out = tmp_path / "torchrun"
    r = subprocess.run(torchrun_cmd(tiny_shards, out, "--nproc_per_node", "2", "--master_port",
                                    str(free_port())), env=env(), capture_output=True, text=True)
    check(r, "torchrun --nproc_per_node 2")
    same_weights(one_machine_run, out)


def test_torchrun_on_two_nodes_matches_accelerate_launch(one_machine_run, tiny_shards,
                                                         tmp_path):
    out, port = tmp_path / "torchrun-2-nodes", str(free_port())
    run_machines([torchrun_cmd(tiny_shards, out, "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                               "--master_port", port) for rank in (0, 1)])
    same_weights(one_machine_run, out)
