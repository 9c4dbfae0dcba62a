"""Optimizer steps/s of shardtrain's training loop vs a bare PyTorch loop, same in-memory batch.

Both: resnet9 16-32-64-128, batch 256, Adam (wd 1e-4), clip_value 0.1, label smoothing 0.1,
one-cycle, 1 process on this CPU, one FashionMNIST batch reused for every step, in fp32 or (with
`--precision bf16`) bf16 autocast; the bare loop also runs in the other precision (the lever
behind `train.precision=auto`, which picks bf16 on CPUs with AVX512-BF16/AMX, as here).
  - bare (channels_last, and NCHW as a lever check): forward, loss, backward,
    clip_grad_value_, optimizer.step, zero_grad(set_to_none), scheduler.step;
  - shardtrain: the real `Loop.run` of loop.py, built by train.py's own functions (accelerator,
    data, model, param groups, scheduler, Reporter), with the recipe `fashion-mnist-resnet9`.
    Only the shard loader is swapped for an iterator that yields the same uint8 batch dict
    (images, labels, crop/flip parameters) every time, so the step body measured includes
    prepare_batch (pad-crop, flip, normalise, channels_last), accelerate's accumulate/backward/
    clip, scheduler, EMA/logging bookkeeping, the preemption check and the periodic logging.
Timing: seconds between consecutive batches requested by the loop (= one full step), skipping
the first WARMUP steps of a measurement; variants interleaved A, B, C, A, B, C...; medians.
`--compile` adds the bare loop under torch.compile (slow to compile on CPU; measured once).

    .venv/bin/python bench/trainer_overhead.py [--quick] [--compile] [--precision bf16]
Writes bench/results/trainer_overhead.json (trainer_overhead-bf16.json with --precision bf16).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import RESULTS, ensure_packed, interleaved, machine, median, save_json

import shardtrain.loop
from shardtrain.config import load_config
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import Batches, train_options
from shardtrain.models import create_model
from shardtrain.optim import make_optimizer, make_scheduler, param_groups

WARMUP = 3
BATCH = 256
RECIPE = "fashion-mnist-resnet9"


def one_batch(data: Path, cfg) -> dict:
    """The loader's real batch dict for micro-batch 0 (uint8 images + crop/flip parameters)."""
    index = load_index(data)
    table = sample_table(index, "train")
    options = train_options(cfg.augment, cfg.train.seed, index.channels, index.image_size[0])
    return Batches(table, options, lambda i: (0, torch.arange(BATCH)), 1)[0]


class StepClock:
    """An endless loader of the same batch that records when each step asks for the next one."""

    def __init__(self, batch: dict, steps: int):
        self.batch, self.steps, self.times = batch, steps, []

    def __iter__(self):
        for _ in range(self.steps):
            self.times.append(time.perf_counter())
            yield self.batch

    def steps_per_sec(self) -> float:
        t = self.times[WARMUP:]
        return (len(t) - 1) / (t[-1] - t[0])


def shardtrain_runner(data: Path, batch: dict, steps: int, out: Path, extra=()):
    """A callable running Loop.run for `steps` steps and returning its steps/s."""
    from shardtrain import train as T

    cfg = load_config(RECIPE, [f"data.path={data}", "data.val_split=", "data.test_split=",
                               "log.wandb=false", "log.plots=false", *extra])
    acc = T.make_accelerator(cfg)
    d = T.setup_data(cfg, acc)
    torch.manual_seed(0)
    model, meta = T.build_model(cfg, d.index, d.image_size)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = make_optimizer(o.name, param_groups(model, o.weight_decay, o.head_lr_mult),
                               o.max_lr, o.momentum, o.nesterov, tuple(o.betas))
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)

    def run() -> float:
        total = steps + 1  # the last step ends an "epoch" (checkpoint): not timed
        scheduler = make_scheduler(optimizer, o.max_lr, total, o.schedule, o.warmup_frac,
                                   o.div_factor, o.final_div_factor)
        reporter = T.Reporter(acc, out, total, 0)
        loop = shardtrain.loop.Loop(cfg, acc, d, model, optimizer, scheduler, total_steps=total,
                                    reporter=reporter, meta=meta, out_dir=out)
        clock = StepClock(batch, total)
        with mock.patch.object(shardtrain.loop, "make_train_loader", lambda *a, **k: clock):
            loop.run(shardtrain.loop.State())
        reporter.close()
        return clock.steps_per_sec()

    return run


def bare_runner(batch: dict, cfg, steps: int, channels_last: bool, compile_: bool = False,
                bf16: bool = False):
    torch.manual_seed(0)
    model = create_model("resnet9", 10, 1, widths=cfg.model.widths)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mem)
    x = ((batch["images"].float() / 255 - 0.286) / 0.353).contiguous(memory_format=mem)
    y = batch["labels"]
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    fwd = torch.compile(model) if compile_ else model

    def run() -> float:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.01, total_steps=steps + 1)
        times = []
        for _ in range(steps):
            times.append(time.perf_counter())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(fwd(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        times.append(time.perf_counter())
        t = times[WARMUP:]
        return (len(t) - 1) / (t[-1] - t[0])

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also the bare loop compiled")
    ap.add_argument("--precision", choices=("no", "bf16"), default="no",
                    help="of the loop pair (bf16 = autocast); the bare loop also runs in the other")
    args = ap.parse_args()
    steps, rounds = (12, 1) if args.quick else (40, 3)
    data = ensure_packed("fm-npy", "npy")  # 234 steps per epoch: no epoch end while timed
    cfg = load_config(RECIPE)
    batch = one_batch(data, cfg)
    out = Path(tempfile.mkdtemp(prefix="shardtrain-bench-"))
    bf16 = args.precision == "bf16"  # accelerate allows one precision per process
    variants = {
        "bare_channels_last": bare_runner(batch, cfg, steps, True, bf16=bf16),
        "shardtrain_loop": shardtrain_runner(data, batch, steps, out / "a",
                                             [f"train.precision={args.precision}"]),
        "bare_nchw": bare_runner(batch, cfg, steps, False, bf16=bf16),
        # the precision lever: the bare loop in the other precision
        "bare_other_precision_channels_last": bare_runner(batch, cfg, steps, True, bf16=not bf16),
    }
    if args.compile:
        variants["bare_compiled_channels_last"] = bare_runner(batch, cfg, steps, True, True,
                                                              bf16=bf16)
        variants["bare_compiled_channels_last"]()  # compile once, outside the measurement
    rates = interleaved(variants, rounds)
    meds = {k: median(v) for k, v in rates.items()}
    base = meds["bare_channels_last"]
    res = {"machine": machine(), "steps_per_measurement": steps, "rounds": rounds,
           "batch": BATCH, "steps_per_sec": {k: round(v, 3) for k, v in meds.items()},
           "all_rates": {k: [round(r, 3) for r in v] for k, v in rates.items()},
           "ratio_vs_bare_channels_last": {k: round(v / base, 3) for k, v in meds.items()}}
    res["precision"] = args.precision
    for k, v in meds.items():
        print(f"{k:>34}: {v:6.3f} steps/s ({v * BATCH:6.0f} img/s)  {v / base:.3f}x bare "
              f"({args.precision})")
    name = "trainer_overhead" + ("-bf16" if bf16 else "") + ("-quick" if args.quick else "")
    save_json(RESULTS / f"{name}.json", res)


if __name__ == "__main__":
    sys.exit(main())
