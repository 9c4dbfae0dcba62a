"""Helpers shared by the bench scripts: paths, packed data sets, interleaved timing, peak RSS."""

from __future__ import annotations

import json
import platform
import statistics
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


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (MB), from psutil."""
    import psutil

    p = psutil.Process(pid)
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20
