"""bench/gpu_check.py (`make test-gpu`): the no-GPU line, the table, and a CPU dry run of every
check (its GPU-only checks report themselves skipped)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import RUNS, shardtrain_env

pytestmark = RUNS  # real training subprocesses

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--json", tmp_path / "x.json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "no CUDA GPU" in r.stdout
    assert not (tmp_path / "x.json").exists()


def test_table_marks_ok_failed_and_skipped():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    table = gpu_check.format_table([{"check": "a", "ok": True, "summary": "fine"},
                          {"check": "b", "ok": False, "summary": "broke"},
                          {"check": "c", "ok": None, "summary": "needs CUDA"}])
    assert table.splitlines()[2:] == ["| a | ok | fine |", "| b | FAILED | broke |",
                                      "| c | skipped | needs CUDA |"]


@pytest.mark.slow
def test_dry_run_runs_every_check_on_cpu(learnable_shards, tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--data", learnable_shards,
                        "--set", "data.batch_size=32", "--json", out, "--budget", "1200"],
                       capture_output=True, text=True, timeout=1500, env=shardtrain_env(1))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads(out.read_text())["checks"]}
    skipped = {"fp16", "compile", "pinned", "resnet50_fp16"}  # CUDA only
    assert {name for name, row in rows.items() if row["ok"] is None} == skipped
    assert all(row["ok"] is True for name, row in rows.items() if name not in skipped)
    assert rows["bitwise"]["figures"]["max_abs_diff"] == 0.0
    assert rows["bitwise"]["figures"]["resumed_from"] >= 2
    assert rows["ddp_sync_bn"]["figures"]["ranks_identical"] is True
    assert "| bitwise | ok |" in r.stdout
