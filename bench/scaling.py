"""Data-parallel scaling on this CPU: `shardtrain train` on 2 processes vs 1, same recipe.

Each run trains the `fashion-mnist-resnet9` recipe (global batch 256) for a fixed number of
optimizer steps on the full FashionMNIST shards with no per-epoch or final evaluation, and
images/s is read from final.json (`images_per_second`: images over training seconds, loader
start-up included, evaluation and checkpoints excluded). 2 processes = `accelerate launch` in
MULTI_CPU mode (gloo), as users run it. Variants interleaved, medians.

    .venv/bin/python bench/scaling.py [--quick]
Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from common import (RESULTS, ensure_packed, interleaved, machine, median, save_json,
                    train_command)


def run(nproc: int, workers: int, steps: int) -> float:
    data = ensure_packed("fm-npy", "npy")
    out = RESULTS / "runs" / f"scaling-{nproc}p-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = train_command(
        ["--recipe", "fashion-mnist-resnet9", "--data", str(data), "--out", str(out),
         "data.val_split=", "data.test_split=", "log.wandb=false", "log.plots=false",
         f"train.max_steps={steps}", f"data.workers={workers}"], nproc, port=29733)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == nproc, final
    print(f"{nproc} process(es), {workers} worker(s) each: {final['images_per_second']} img/s",
          flush=True)
    return final["images_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, rounds = (30, 1) if args.quick else (80, 2)
    variants = {"1p_w1": lambda: run(1, 1, steps), "2p_w1": lambda: run(2, 1, steps),
                "1p_w2": lambda: run(1, 2, steps)}
    rates = interleaved(variants, rounds)
    meds = {k: median(v) for k, v in rates.items()}
    res = {"machine": machine(), "steps": steps, "rounds": rounds, "global_batch": 256,
           "images_per_sec": {k: round(v, 1) for k, v in meds.items()},
           "all_rates": rates,
           "ratio_2p_vs_1p": round(meds["2p_w1"] / max(meds["1p_w1"], meds["1p_w2"]), 3)}
    for k, v in meds.items():
        print(f"{k}: {v:.0f} img/s")
    print(f"2 processes / best 1 process = {res['ratio_2p_vs_1p']:.2f}x")
    save_json(RESULTS / ("scaling-quick.json" if args.quick else "scaling.json"), res)


if __name__ == "__main__":
    sys.exit(main())
