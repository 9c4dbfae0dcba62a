"""Shards behind URLs: a real nginx (and moto's S3 server), faults, the node cache, exactness.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_remote.py -q
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import pytest

from helpers import RUNS, kill_tree, read_json, read_jsonl, run_shardtrain, start, wait_for_step
from servers import FaultProxy, MotoS3, Nginx
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint
from shardtrain.data.cache import ShardCache, ShardRef
from shardtrain.data.index import load_index
from shardtrain.data.remote import Retry, filesystem
from shardtrain.errors import DataError, UserError
from test_resume import same_weights

pytestmark = RUNS  # real training subprocesses

# dropout on, 2 loader workers: the RNG streams and the worker split must survive the cache
COMMON = ["train.epochs=2", "train.log_every=1", "train.checkpoint_every=4",
          "model.dropout=0.2", "data.workers=2", "data.retry_delay=0.02"]


def train_args(data, out, recipe, *extra):
    return ["train", "--recipe", recipe, "--data", data, "--out", out, *COMMON, *extra]


@pytest.fixture(scope="module")
def served(learnable_shards, tmp_path_factory):
    """nginx serving a copy of learnable_shards (a copy: tests may break files in it)."""
    base = tmp_path_factory.mktemp("served")
    folder = Path(shutil.copytree(learnable_shards, base / "shards"))
    with Nginx(folder, base / "nginx") as web:
        yield web, folder


@pytest.fixture(scope="module")
def local_run(learnable_shards, tiny_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    run_shardtrain(train_args(learnable_shards, out, tiny_recipe))
    return out


def shard_bytes(folder: Path, split: str = "train") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"{split}-*.tar"))


def test_training_from_url_with_faults_is_bitwise_the_local_run(served, local_run, tiny_recipe,
                                                                tmp_path):
    web, folder = served
    shard = (folder / "train-000000.tar").stat().st_size  # 6 train shards of this size
    limit = 4 * shard  # the 4-shard window fits; shards of finished windows are evicted
    with FaultProxy(web.url, fail_first=3, cut_shard=2) as proxy:
        r = run_shardtrain(train_args(proxy.url, tmp_path / "run", tiny_recipe,
                                      f"data.cache_dir={tmp_path / 'cache'}",
                                      f"data.cache_limit={limit}", "data.prefetch_shards=1"))
    statuses = [status for _, status in proxy.log]
    assert statuses[:3] == [503] * 3 and -1 in statuses  # the faults really happened
    assert same_weights(local_run / "model.safetensors", tmp_path / "run" / "model.safetensors")
    a, b = read_json(local_run / "final.json"), read_json(tmp_path / "run" / "final.json")
    assert a["test_acc"] == b["test_acc"] and a["steps"] == b["steps"] == 24, r.stderr[-2000:]
    per_epoch = b["downloaded_bytes_per_epoch"]
    assert len(per_epoch) == 2 and per_epoch[0] == [shard_bytes(folder)]  # each shard once
    assert per_epoch[1][0] % shard == 0  # whole shards: those evicted since came back
    logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "data"]
    assert [r["data/downloaded_bytes/node0"] for r in logged] == [e[0] for e in per_epoch]
    assert b["eval_downloaded_bytes"] >= shard_bytes(folder, "val") + shard_bytes(folder, "test")


def test_preempted_run_resumes_from_url_bitwise(served, local_run, tiny_recipe, tmp_path):
    web, _ = served
    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    proc = start(train_args(web.url, out, tiny_recipe, cache), nproc=1)
    wait_for_step(out, proc, 3)
    kill_tree(proc, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    shutil.rmtree(tmp_path / "cache")  # a cold cache on the node that resumes
    run_shardtrain(train_args(web.url, out, tiny_recipe, cache, "--resume", "auto"))
    assert same_weights(local_run / "model.safetensors", out / "model.safetensors")
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 25))


def test_node_plan_resumes_from_url_bitwise(served, learnable_shards, local_run, tiny_recipe,
                                            tmp_path):
    """data.partition=node: preempted, resumed on a cold cache without restating C (the
    checkpoint's is kept), the run ends bitwise equal to the uninterrupted local one."""
    web, _ = served
    node, c2 = "data.partition=node", "data.canonical_nodes=2"
    local = tmp_path / "local"
    run_shardtrain(train_args(learnable_shards, local, tiny_recipe, node, c2))
    assert not same_weights(local_run / "model.safetensors", local / "model.safetensors")
    out, cache = tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"
    proc = start(train_args(web.url, out, tiny_recipe, cache, node, c2), nproc=1)
    wait_for_step(out, proc, 3)
    kill_tree(proc, signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    shutil.rmtree(tmp_path / "cache")
    run_shardtrain(train_args(web.url, out, tiny_recipe, cache, node, "--resume", "auto"))
    assert same_weights(local / "model.safetensors", out / "model.safetensors")
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(1, 25))
    assert "canonical_nodes: 2" in (out / "config.yaml").read_text()


def test_dead_shard_exits_1_naming_the_url_and_keeps_checkpoints(served, local_run, tiny_recipe,
                                                                 tmp_path):
    web, _ = served
    run = Path(shutil.copytree(local_run, tmp_path / "run"))
    before = latest_checkpoint(run / "checkpoints")
    with FaultProxy(web.url, broken=("train-000003.tar",)) as proxy:
        r = run_shardtrain(train_args(proxy.url, run, tiny_recipe, "train.epochs=3",
                                      "data.retries=3", f"data.cache_dir={tmp_path / 'c'}",
                                      "--resume", "auto"), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    error = r.stderr.strip().splitlines()[-1]
    assert f"{proxy.url}/train-000003.tar" in error and "after 3 attempts" in error
    assert latest_checkpoint(run / "checkpoints") == before
    assert load_checkpoint(before)["trainer"]["step"] == 24


def test_missing_index_or_backend_is_one_line(served, tiny_recipe, tmp_path, monkeypatch):
    web, _ = served
    r = run_shardtrain(train_args(f"{web.url}/nothing-here", tmp_path / "run", tiny_recipe),
                       check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{web.url}/nothing-here" in r.stderr and "index.json" in r.stderr
    with pytest.raises(UserError, match="unknown://"):
        filesystem("unknown://bucket/x")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    with pytest.raises(UserError, match=r"gs:// URLs needs gcsfs: pip install 'shardtrain\[gcs"):
        filesystem("gs://bucket/shards/index.json")


def test_node_cache_downloads_a_shard_once_and_verifies_it(served, tmp_path):
    web, folder = served
    index = load_index(web.url)
    s = index.split("train").shards[1]
    ref = ShardRef(f"{web.url}/{s['file']}", s["file"], s["sha256"], s["bytes"])
    cache = ShardCache(tmp_path / "cache", 0, Retry(3, 0.01))
    get = f"GET /{s['file']} HTTP/1.1"
    gets_before = web.requests().count(get)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.ensure(ref)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(n for _, n in results) == s["bytes"] and len({p for p, _ in results}) == 1
    assert web.requests().count(get) == gets_before + 1  # 6 threads, one download
    assert results[0][0].read_bytes() == (folder / s["file"]).read_bytes()
    bad = ShardRef(ref.url, ref.name, "0" * 64, ref.nbytes)  # bytes that differ from the index
    with pytest.raises(DataError, match="failed after 3 attempts: ShortBody.*sha256 differs"):
        cache.ensure(bad)
    assert not list((tmp_path / "cache").glob("*/*tmp*"))  # no half entry left behind
    missing = ShardRef(f"{web.url}/train-999999.tar", "train-999999.tar", "1" * 64, 10)
    n_before = len(web.requests())
    with pytest.raises(DataError, match="train-999999.tar: not found"):
        cache.ensure(missing)
    assert len(web.requests()) == n_before + 1  # a 404 is not retried


def test_url_data_reads_index_json_once_and_uploads_it_as_the_dataset_artifact(
        served, tiny_recipe, tmp_path):
    pytest.importorskip("wandb")
    from accelerate import Accelerator

    from shardtrain.config import load_config
    from shardtrain.data.index import remote_index_bytes
    from shardtrain.tracking.artifacts import dataset_artifact
    from shardtrain.train import setup_data

    web, folder = served
    remote_index_bytes.cache_clear()  # earlier tests in this process may have read it
    gets_before = web.requests().count("GET /index.json HTTP/1.1")
    cfg = load_config(str(tiny_recipe), [f"data.path={web.url}",
                                         f"data.cache_dir={tmp_path / 'cache'}"])
    d = setup_data(cfg, Accelerator(cpu=True))
    artifact, aliases = dataset_artifact(d.index, d.index_json, d.index_hash)
    assert web.requests().count("GET /index.json HTTP/1.1") == gets_before + 1
    assert d.index_json == (folder / "index.json").read_bytes()
    assert d.index_hash == hashlib.sha256(d.index_json).hexdigest()
    entries = artifact.manifest.entries
    assert open(entries["index.json"].local_path, "rb").read() == d.index_json
    assert entries["shards/train-000000.tar"].ref == f"{web.url}/train-000000.tar"
    assert aliases == [f"index-{d.index_hash[:12]}"]
    assert artifact.metadata["index_hash"] == d.index_hash


def test_eviction_is_lru_and_spares_protected_entries(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=250, retry=Retry())
    paths = []
    for i in range(4):
        p = tmp_path / "ab" / f"{i:064d}.tar"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 100)
        os.utime(p, (1000 + i, 1000 + i))  # 0 is the least recently used
        paths.append(p)
    removed = cache.evict(protected={paths[0]})
    assert removed == [paths[1], paths[2]] and paths[0].exists() and paths[3].exists()


def test_training_from_s3_matches_local(learnable_shards, local_run, tiny_recipe, tmp_path):
    with MotoS3() as s3:
        url = s3.upload(learnable_shards, "datasets", "learnable")
        run_shardtrain(train_args(url, tmp_path / "run", tiny_recipe,
                                  f"data.cache_dir={tmp_path / 'cache'}"), env=s3.env)
    assert same_weights(local_run / "model.safetensors", tmp_path / "run" / "model.safetensors")
    final = read_json(tmp_path / "run" / "final.json")
    assert final["downloaded_bytes_per_epoch"][1] == [0]  # the cache held it all: no egress


def test_reader_keeps_only_the_current_batch_cached_shards_open(tmp_path):
    """An open file keeps an evicted entry's bytes on disk: readers close earlier shards."""
    from shardtrain.data.reader import ShardReader

    paths = [tmp_path / f"{i}.tar" for i in range(3)]
    for p in paths:
        p.write_bytes(b"abcdef")

    class Cached:  # stands in for RemoteShards: the entries are already in the cache
        refs = [ShardRef(f"http://x/{i}", f"{i}.tar", "0" * 64, 6) for i in range(3)]

        def fetch(self, shard):
            return paths[shard], 0

    reader = ShardReader(paths, remote=Cached())
    reader.open_shards([0, 1])
    assert reader.read(1, 2, 3) == b"cde"
    reader.open_shards([2])
    assert list(reader._files) == [2]
