"""Shards behind a URL: loader throughput from nginx vs local disk, and egress per epoch.

    .venv/bin/python bench/remote.py [--quick]

1. Throughput: images/s of the shard loader (`make_train_loader`, 2 workers, recipe-like
   augmentation, no model) over 3,000 generated 100 px JPEGs in shards of 250, read from local
   disk, from a real nginx on 127.0.0.1 with a cold node cache (emptied before every round),
   and with a warm one (filled once). 7 interleaved rounds, medians. Loopback is not a WAN: the
   cold figure shows the cache's own cost (download, sha256, rename), not a network's.
2. Egress: bytes downloaded per epoch per node for 1 vs 2 simulated nodes, global vs
   node-partitioned plan (data.partition=node, C = the node count), each node with its own
   cache holding half the dataset (data.cache_limit). Every node runs its rank's real loader
   (the plan, the prefetcher, the cache and its LRU eviction) for 3 epochs against nginx.
Writes bench/results/remote[-quick].json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from common import DATA, RESULTS, ensure_packed, interleaved, machine, median, plan_for, save_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import Nginx  # noqa: E402 - the tests' nginx fixture, reused as is

from shardtrain.data.cache import ShardCache  # noqa: E402
from shardtrain.data.index import load_index, sample_table  # noqa: E402
from shardtrain.data.loader import SampleOptions, make_train_loader  # noqa: E402
from shardtrain.data.remote import Retry  # noqa: E402

BATCH = 128


def jpeg_dataset(n: int) -> Path:
    from loader import fruits_like, write_folder

    images, labels = fruits_like(n)
    folder = write_folder(DATA / f"fruits-jpg-files-{n}", images, labels, "jpg", quality=90)
    return ensure_packed(f"remote-fruits-{n}", "auto", str(folder), shard_size=250)


def loader_rate(location: str, cache_dir: Path | None) -> float:
    """Steady-state images/s over one epoch (the clock starts at the first batch)."""
    import time

    index = load_index(location)
    cache = ShardCache(cache_dir, 0, Retry()) if cache_dir else None
    table = sample_table(index, "train", cache=cache)
    plan = plan_for(index, BATCH)
    options = SampleOptions(channels=3, image_size=96, train=True, seed=0, pad_crop=8,
                            hflip=True, resized_crop=0.35)
    loader = make_train_loader(table, plan, options, start_micro=0,
                               end_micro=plan.micro_per_epoch, workers=2, prefetch=4,
                               pin_memory=False)
    n, t0 = 0, None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(batch["labels"])
    return n / (time.perf_counter() - t0)


def throughput(data: Path, web: Nginx, rounds: int, tmp: Path) -> dict:
    warm = tmp / "warm-cache"
    loader_rate(web.url, warm)  # fill it once

    def cold() -> float:
        shutil.rmtree(tmp / "cold-cache", ignore_errors=True)
        return loader_rate(web.url, tmp / "cold-cache")

    rates = interleaved({"local": lambda: loader_rate(str(data), None),
                         "nginx_cold": cold,
                         "nginx_warm": lambda: loader_rate(web.url, warm)}, rounds)
    out = {k: {"median_img_s": round(median(v), 1), "rates": [round(x, 1) for x in v]}
           for k, v in rates.items()}
    for k in ("nginx_cold", "nginx_warm"):
        out[f"{k}_vs_local"] = round(median(rates[k]) / median(rates["local"]), 3)
    return out


def node_egress(url: str, nodes: int, partition: str, epochs: int, limit: int,
                tmp: Path) -> list[list[int]]:
    """[epoch][node] bytes downloaded, one rank per node, each node its own cache."""
    index = load_index(url)
    per_node = []
    for node in range(nodes):
        cache = ShardCache(tmp / f"{partition}-{nodes}-node{node}", limit, Retry())
        table = sample_table(index, "train", cache=cache)
        table.remote.prefetch_shards = 2
        plan = plan_for(index, 64, world=nodes, rank=node, partition=partition,
                        canonical=nodes if partition == "node" else 1, nodes=nodes)
        options = SampleOptions(channels=index.channels, image_size=index.image_size[0],
                                train=True)
        loader = make_train_loader(table, plan, options, start_micro=0,
                                   end_micro=plan.micro_per_epoch * epochs, workers=0,
                                   prefetch=2, pin_memory=False)
        for _ in loader:
            pass
        per_node.append([table.downloads.take(e) for e in range(epochs)])
    return [list(col) for col in zip(*per_node)]


def egress(quick: bool, web_root: Path, tmp: Path) -> dict:
    from conftest import make_image_folder

    src = make_image_folder(tmp / "egress-src", [f"c{i}" for i in range(4)],
                            60 if quick else 200, size=32)
    data = ensure_packed(f"remote-egress-{'q' if quick else 'full'}", "npy", str(src),
                         shard_size=50)
    served = web_root / data.name
    shutil.copytree(data, served, dirs_exist_ok=True)
    dataset = sum(p.stat().st_size for p in served.glob("train-*.tar"))
    rows = {}
    with Nginx(served, tmp / "nginx-egress") as web:
        for nodes, partition in ((1, "global"), (2, "global"), (2, "node")):
            epochs = node_egress(web.url, nodes, partition, 3, dataset // 2, tmp)
            rows[f"{nodes}_nodes_{partition}"] = {
                "bytes_per_epoch_per_node": epochs,
                "dataset_per_epoch": [round(sum(e) / dataset, 2) for e in epochs]}
    return {"dataset_bytes": dataset, "cache_limit_per_node": dataset // 2, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=["all", "throughput", "egress"], default="all",
                        help="egress alone is light (byte counts do not depend on the load)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    out = {"machine": machine()}
    if args.part in ("all", "throughput"):
        data = jpeg_dataset(1_000 if args.quick else 3_000)
        with Nginx(data, tmp / "nginx") as web:
            speed = out["throughput_2_workers"] = throughput(data, web, 2 if args.quick else 7,
                                                             tmp)
        print(f"loader img/s (2 workers): local {speed['local']['median_img_s']}, nginx cold "
              f"{speed['nginx_cold']['median_img_s']} ({speed['nginx_cold_vs_local']}x), "
              f"warm {speed['nginx_warm']['median_img_s']} ({speed['nginx_warm_vs_local']}x)")
    if args.part in ("all", "egress"):
        served = tmp / "served"
        served.mkdir()
        out["egress"] = egress(args.quick, served, tmp)
        print_egress(out["egress"])
    name = "remote" + ("" if args.part == "all" else f"-{args.part}")
    save_json(RESULTS / f"{name}{'-quick' if args.quick else ''}.json", out)
    shutil.rmtree(tmp, ignore_errors=True)


def print_egress(e: dict) -> None:
    print(f"egress, dataset {e['dataset_bytes'] / 1e6:.1f} MB, cache "
          f"{e['cache_limit_per_node'] / 1e6:.1f} MB per node")
    for name, row in e.items():
        if isinstance(row, dict):
            print(f"  {name:16} per epoch (x dataset): {row['dataset_per_epoch']}  "
                  f"bytes [epoch][node]: {row['bytes_per_epoch_per_node']}")


if __name__ == "__main__":
    main()
