"""Two simulated nodes training from nginx: egress per node, global vs node-partitioned plan.

Run: PYTHONPATH=src .venv/bin/python -m pytest -m slow tests/test_remote_nodes.py
Each simulated node is an `accelerate launch --num_machines 2 --machine_rank R` with 1 process
and its own cache folder (half the dataset: data.cache_limit), as on two real machines.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import read_json, read_jsonl
from servers import Nginx
from test_launch import check, env, free_port, launch_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # launches of <= 5 min


def two_nodes(url: str, out: Path, cache: Path, limit: int, partition: str) -> None:
    port = str(free_port())
    machines = [subprocess.Popen(
        launch_cmd(url, out, "--num_machines", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--rdzv_backend", "static", "--same_network")
        + [f"data.partition={partition}", f"data.cache_dir={cache}-node{rank}",
           f"data.cache_limit={limit}", "data.prefetch_shards=1", "data.shuffle_window=1",
           "train.epochs=2",
           "data.batch_size=8"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for rank, p in enumerate(machines):
        stdout, stderr = p.communicate()
        check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr),
              f"machine {rank}")


def test_node_plan_halves_egress_of_two_nodes(tiny_shards, tmp_path):
    dataset = sum(p.stat().st_size for p in Path(tiny_shards).glob("train-*.tar"))
    shard = max(p.stat().st_size for p in Path(tiny_shards).glob("train-*.tar"))
    per_epoch = {}
    with Nginx(tiny_shards, tmp_path / "nginx") as web:
        for partition in ("global", "node"):
            out = tmp_path / partition
            two_nodes(web.url, out, tmp_path / f"cache-{partition}", 2 * shard, partition)
            final = read_json(out / "final.json")
            assert final["world_size"] == 2 and final["ranks_identical"] is True
            per_epoch[partition] = final["downloaded_bytes_per_epoch"]
            logged = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "data"]
            assert [[r["data/downloaded_bytes/node0"], r["data/downloaded_bytes/node1"]]
                    for r in logged] == per_epoch[partition]
    print(per_epoch)
    assert per_epoch["global"][0] == [dataset, dataset]  # both nodes read every shard, once
    assert all(sum(epoch) > 0 for epoch in per_epoch["global"])  # and again: the cache is small
    first = per_epoch["node"][0]
    assert all(b > 0 for b in first) and sum(first) <= dataset + shard  # ~1x, 1 may straddle
