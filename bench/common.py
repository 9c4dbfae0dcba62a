"""Helpers shared by the bench scripts: paths, packed data sets, train plans, interleaved timing,
peak RSS/PSS."""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = RESULTS / "data"
VENV_BIN = HERE.parent / ".venv" / "bin"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def ensure_packed(name: str, fmt: str, source: str = FASHION_MNIST, **kw) -> Path:
    """Pack `source` once into bench/results/data/NAME (no val carve-out unless given)."""
    from shardtrain.data.pack import write_shards

    out = DATA / name
    if not (out / "index.json").exists():
        kw.setdefault("val_fraction", 0.0)
        write_shards(source, out, fmt=fmt, overwrite=True, progress=False, **kw)
    return out


def plan_for(index, batch: int, world=1, rank=0, partition="global", canonical=1, nodes=1):
    """The TrainPlan of `index`'s train split: no grad accumulation, seed 0, window 4."""
    from shardtrain.data.plan import TrainPlan

    sizes = tuple(s["num_samples"] for s in index.split("train").shards)
    return TrainPlan(sizes, batch, world, rank, 1, 0, 4, partition, canonical, nodes)


def interleaved(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Run every variant `rounds` times as A, B, A, B, ...; each call returns a rate."""
    rates = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            rates[name].append(fn())
    return rates


def median(xs) -> float:
    return float(statistics.median(xs))


def save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def machine() -> dict:
    import os

    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process and all its children in MB. RSS counts pages shared by the
    workers (torch's libraries) once per process; PSS splits them, so PSS sums to real use."""
    import psutil

    p = psutil.Process(pid)
    rss = pss = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            info = q.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss / 2**20, pss / 2**20


class PeakMemory:
    """Peak (RSS, PSS) in MB of a process tree, sampled every 50 ms while in the `with` block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, [0.0, 0.0], threading.Event()

    def __enter__(self):
        def sample():
            while not self.stop.is_set():
                rss, pss = tree_memory_mb(self.pid)
                self.peak[:] = max(self.peak[0], rss), max(self.peak[1], pss)
                time.sleep(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def result(self) -> dict:
        return {"rss": round(self.peak[0], 1), "pss": round(self.peak[1], 1)}


def train_command(train_args: list[str], nproc: int, port: int) -> tuple[list[str], dict]:
    """(command, env) running `shardtrain train` on nproc real CPU processes (launch/README.md:
    needs ACCELERATE_USE_CPU=1 with --multi_gpu; `--cpu --num_processes 2` starts one)."""
    import os

    env = dict(os.environ, WANDB_MODE="disabled")
    train = ["-m", "shardtrain", "train", *train_args]
    if nproc == 1:
        return [str(VENV_BIN / "python"), *train], env
    env["ACCELERATE_USE_CPU"] = "1"
    return [str(VENV_BIN / "python"), "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *train], env
