"""The JPEG path of the transfer recipes: shard loader vs torchvision ImageFolder + PIL vs timm.

Generated photographs (bench/photos.py: dead-leaves scenes, ~500x375, JPEG quality 90, ~75 KB),
the same augmentation everywhere: RandomResizedCrop(SIZE, scale=(0.35, 1), ratio 3/4..4/3) +
horizontal flip + colour jitter 0.2 (brightness, contrast, saturation), normalised float output;
batch 64 (the transfer recipes'), the same number of workers:
  - shard: shards packed from the same files (the JPEG bytes are stored unchanged), the real
    make_train_loader + prepare_batch (workers: libjpeg-turbo decode + resized crop, uint8;
    training device: flips, jitter as one colour matrix per image, normalise, channels_last);
  - shard_max<N>: the same, packed with `shardtrain pack --max-size N`;
  - imagefolder: torchvision ImageFolder, PIL decode, per-sample PIL RandomResizedCrop + flip +
    ColorJitter + ToTensor + Normalize in the workers;
  - timm: timm.data.create_loader (PIL decode, RRC + flip + jitter in the workers on uint8,
    normalisation in its PrefetchLoader on the device, here the CPU).
Steady-state images/s after the batches the workers had prefetched, variants interleaved A, B,
C, ...; medians; and the CPU time of the whole process tree per image (what a contended machine
distorts least).
Memory: peak PSS/RSS (process tree) of `shardtrain pack` and of the shard loader (a fixed number
of batches) on 10k vs 100k JPEG thumbnails (160x120 photographs, copies of 1,000 made distinct
by a JPEG comment so 100k need not be generated).

    pip install -e '.[bench]'                          # timm, for the benchmark only
    .venv/bin/python bench/loader_jpeg.py [--quick] [--size 224] [--workers 2] [--no-memory]
Writes bench/results/loader_jpeg.json (-quick.json); with --no-memory the memory figures of the
earlier run are kept (memory_from: its date).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import DATA, RESULTS, VENV_BIN, PeakMemory, ensure_packed, interleaved, machine
from common import plan_for, save_json
from loader import summarize
from photos import copies_with_comments, write_photo_folder
from PIL import Image

from shardtrain.data.batch import BatchOptions, prepare_batch
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import SampleOptions, make_train_loader

BATCH = 64
SCALE = 0.35
JITTER = 0.2
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def shard_loader(data: Path, size: int, workers: int, batches: int):
    index = load_index(data)
    table = sample_table(index, "train")
    plan = plan_for(index, BATCH)
    options = SampleOptions(channels=3, image_size=size, train=True, seed=0,
                            resized_crop=SCALE, hflip=True, color_jitter=JITTER)
    opts = BatchOptions(torch.tensor(MEAN), torch.tensor(STD), "standardize", 0,
                        channels_last=True)
    # more batches than are read: the workers are still alive when the CPU time is taken
    loader = make_train_loader(table, plan, options, start_micro=0,
                               end_micro=warmup(workers) + batches + 16, workers=workers,
                               prefetch=4, pin_memory=False)
    return loader, lambda b: prepare_batch(b, torch.device("cpu"), opts, train=True)[0]


def shard_rate(data: Path, size: int, workers: int, batches: int, name: str = "shard") -> float:
    return timed(*shard_loader(data, size, workers, batches), batches, warmup(workers), name)


def warmup(workers: int) -> int:
    """Batches in flight when the first one arrives (workers x prefetch 4): skipped."""
    return max(1, workers * 4)


def imagefolder_rate(root: Path, size: int, workers: int, batches: int) -> float:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(SCALE, 1.0)), T.RandomHorizontalFlip(),
                    T.ColorJitter(JITTER, JITTER, JITTER), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = torchvision.datasets.ImageFolder(root / "train", transform=tf,
                                          loader=lambda p: Image.open(p).convert("RGB"))
    loader = torch.utils.data.DataLoader(ds, BATCH, shuffle=True, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    return timed(loader, lambda b: b[0], batches, warmup(workers), "imagefolder")


def timm_rate(root: Path, size: int, workers: int, batches: int) -> float:
    import torchvision
    from timm.data import create_loader

    ds = torchvision.datasets.ImageFolder(root / "train")
    loader = create_loader(ds, input_size=(3, size, size), batch_size=BATCH, is_training=True,
                           scale=(SCALE, 1.0), hflip=0.5, color_jitter=JITTER,
                           interpolation="bilinear", mean=tuple(MEAN), std=tuple(STD),
                           num_workers=workers, device=torch.device("cpu"),
                           use_prefetcher=True, persistent_workers=False)
    return timed(loader, lambda b: b[0], batches, warmup(workers), "timm")


CPU_MS: dict[str, list[float]] = {}  # variant -> CPU ms per image of each measurement


def tree_cpu_seconds() -> dict[int, float]:
    """pid -> user + system CPU seconds so far, for this process and all its descendants
    (loader workers, also those started by a forkserver)."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two tree_cpu_seconds() snapshots by the processes alive at the
    second (a process that exited in between, e.g. the previous loader's workers, is left out)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def timed(loader, finish, batches: int, warmup: int, name: str) -> float:
    """Steady-state images/s over `batches` batches after `warmup` (batches the workers had
    prefetched, produced before the clock could see them); also records the CPU time the
    whole process tree spent per image (CPU_MS[name]): on a contended machine wall-clock
    rates follow the scheduler, CPU per image much less."""
    n, t0, c0 = 0, None, {}
    for i, batch in enumerate(loader):
        x = finish(batch)
        if i == warmup:
            t0, c0 = time.perf_counter(), tree_cpu_seconds()
        elif i > warmup:
            n += len(x)
        if i >= warmup + batches:  # measure now: leaving the loop stops the workers
            wall, cpu = time.perf_counter() - t0, cpu_between(c0, tree_cpu_seconds())
            break
    CPU_MS.setdefault(name, []).append(1e3 * cpu / n)
    return n / wall


# ---- memory ---------------------------------------------------------------------------------
def pack_memory(source: Path, out: Path, workers: int) -> dict:
    """`shardtrain pack` as users run it, in a subprocess: peak memory and wall time."""
    cmd = [str(VENV_BIN / "python"), "-m", "shardtrain", "pack", str(source), str(out),
           "--val-fraction", "0", "--workers", str(workers), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ))
    with PeakMemory(proc.pid) as peak:
        if proc.wait() != 0:
            raise SystemExit(f"pack failed: {' '.join(cmd)}")
    return {**peak.result(), "seconds": round(time.perf_counter() - t0, 1)}


def loader_memory(data: Path, size: int, workers: int, batches: int) -> dict:
    with PeakMemory(os.getpid()) as peak:
        loader, finish = shard_loader(data, size, workers, batches)
        for _, batch in zip(range(batches), loader):
            finish(batch)
    return peak.result()


def memory_section(quick: bool, workers: int) -> dict:
    base = write_photo_folder(DATA / "thumbs-1000", n=1000, seed=1, scale=0.32)
    counts = (2_000, 20_000) if quick else (10_000, 100_000)
    out = {}
    for n in counts:
        files = copies_with_comments(base, DATA / f"thumbs-files-{n}", n)
        shards = DATA / f"thumbs-shards-{n}"
        pack = pack_memory(files, shards, workers)
        load = loader_memory(shards, 112, workers, 40)
        out[f"{n}_jpegs"] = {"pack": pack, "loader": load}
        print(f"{n:>7} JPEGs: pack peak PSS {pack['pss']:.0f} MB (RSS {pack['rss']:.0f}) in "
              f"{pack['seconds']:.0f} s; loader (40 batches) peak PSS {load['pss']:.0f} MB "
              f"(RSS {load['rss']:.0f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224, help="training crop side")
    ap.add_argument("--max-size", type=int, default=320, help="the pack --max-size variant")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    # 1 intra-op thread in the main process, as in each of the 2 training processes (torchrun /
    # accelerate set OMP_NUM_THREADS=1): with 2 threads on 2 cores the batch ops spent more CPU in
    # OpenMP spin-waits than they saved (measured: shard loader 8.3 vs 4.4 ms CPU per image)
    torch.set_num_threads(1)
    n_base, n_files = (200, 400) if args.quick else (1_000, 3_000)
    rounds, batches = (1, 6) if args.quick else (3, 20)
    w, size = args.workers, args.size
    out = {"machine": machine(), "load1_start": os.getloadavg()[0], "batch": BATCH, "workers": w,
           "size": size, "rrc_scale": SCALE, "jitter": JITTER, "rounds": rounds,
           "batches_per_measurement": batches}
    base = write_photo_folder(DATA / f"photos-{n_base}", n=n_base)
    files = copies_with_comments(base, DATA / f"photos-files-{n_files}", n_files)
    shards = ensure_packed(f"photos-shards-{n_files}", "auto", str(files))
    small = ensure_packed(f"photos-shards-{n_files}-max{args.max_size}", "auto", str(files),
                          max_size=args.max_size)
    variants = {
        "shard": lambda: shard_rate(shards, size, w, batches),
        f"shard_max{args.max_size}": lambda: shard_rate(small, size, w, batches,
                                                        f"shard_max{args.max_size}"),
        "imagefolder": lambda: imagefolder_rate(files, size, w, batches),
    }
    try:
        import timm  # noqa: F401  (the bench extra)

        variants["timm"] = lambda: timm_rate(files, size, w, batches)
    except ImportError:
        print("timm not installed (pip install -e '.[bench]'): timm's loader left out")
    out["photos"] = summarize(interleaved(variants, rounds), "imagefolder", n_files)
    cpu = {k: round(statistics.median(v), 2) for k, v in CPU_MS.items()}
    out["photos"]["cpu_ms_per_image"] = cpu
    out["photos"]["cpu_ratio_imagefolder_vs"] = {k: round(cpu["imagefolder"] / v, 2)
                                                 for k, v in cpu.items() if k != "imagefolder"}
    print(f"CPU ms per image (process tree): {cpu}")
    if "timm" in variants:
        ips = out["photos"]["images_per_sec"]
        out["photos"]["ratio_shard_vs_timm"] = round(ips["shard"] / ips["timm"], 2)
        print(f"shard / timm: {out['photos']['ratio_shard_vs_timm']:.2f}x")
    out["load1_end"] = os.getloadavg()[0]
    suffix = "" if size == 224 else f"-{size}"
    path = RESULTS / f"loader_jpeg{suffix}{'-quick' if args.quick else ''}.json"
    if not args.no_memory:
        out["memory_mb"] = memory_section(args.quick, w)
    elif path.exists() and "memory_mb" in json.loads(path.read_text()):  # keep the earlier run's
        earlier = json.loads(path.read_text())
        out["memory_mb"] = earlier["memory_mb"]
        out["memory_from"] = earlier.get("memory_from", earlier["machine"]["date"])
    save_json(path, out)


if __name__ == "__main__":
    sys.exit(main())
