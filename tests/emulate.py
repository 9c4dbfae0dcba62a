"""Run `shardtrain` with a GPU-only code path emulated on CPU, or a fault injected at a step.

    python tests/emulate.py [OPTIONS] -- train --recipe R --data D --out O [k=v ...]
    accelerate launch ... tests/emulate.py [OPTIONS] -- train ...     # on 2 CPU processes

Options (each patches shardtrain before `shardtrain.cli.main` runs the command):
  --fp16 SCALE     the fp16 AMP path that accelerate builds only on CUDA, here on CPU: the
                   Accelerator state is set as Accelerator.__init__ sets it for fp16 on a GPU
                   (mixed_precision "fp16", native_amp on, a GradScaler), so prepare() wraps the
                   forward in fp16 autocast, backward() scales the loss, the optimizer steps
                   through scaler.step/update and accelerator.unscale_gradients really unscales.
                   The scaler is a real torch.amp.GradScaler("cpu", init_scale=SCALE) that never
                   grows (growth_interval 10**9): a too-large SCALE makes the first steps
                   overflow and be skipped, each halving the scale.
  --eager-compile  torch.compile with backend="eager": the same OptimizedModule wrapper (and
                   `_orig_mod.` state-dict prefix) as inductor, without minutes of compiling.
  --preempt-at N   every rank agrees on a preemption after optimizer step N (as after SIGUSR1).
  --nan-at N:R     the loss of optimizer step N is NaN on rank R only.
  --fake-clock     the loop's clock advances exactly 1 s per optimizer step, 100 s per
                   checkpoint write and 1000 s per evaluation, and not otherwise.
  --record-losses DIR   every micro-batch loss as {"step", "loss"} lines in DIR/rank{R}.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch


def emulate_fp16(init_scale: float) -> None:
    import shardtrain.tools.lr_find
    import shardtrain.train

    make_accelerator = shardtrain.train.make_accelerator

    def fp16_on_cpu(cfg):
        plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="no"))
        acc = make_accelerator(plain)  # our handlers and checks, a CPU accelerator without AMP
        acc.state._mixed_precision = "fp16"  # what autocast and accelerator.mixed_precision read
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**9)
        return acc

    shardtrain.train.make_accelerator = fp16_on_cpu
    shardtrain.tools.lr_find.make_accelerator = fp16_on_cpu


def eager_compile() -> None:
    torch.compile = functools.partial(torch.compile, backend="eager")


def preempt_at(step: int) -> None:
    from shardtrain.preemption import Preemption

    agreed = Preemption.agreed
    Preemption.agreed = lambda self, acc, s: s == step or agreed(self, acc, s)


def nan_at(step: int, rank: int) -> None:
    from shardtrain.loop import Loop

    micro_step = Loop.micro_step

    def poisoned(self, batch, state):
        if state.step + 1 != step or self.accelerator.process_index != rank:
            return micro_step(self, batch, state)
        criterion = self.criterion
        self.criterion = lambda logits, y: criterion(logits, y) * float("nan")
        try:
            return micro_step(self, batch, state)
        finally:
            self.criterion = criterion

    Loop.micro_step = poisoned


class FakeTime:
    """Stands in for the `time` module inside shardtrain.loop."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def fake_clock() -> None:
    import importlib

    import shardtrain.loop as loop

    clock = FakeTime()
    for name in ("shardtrain.loop", "shardtrain.step"):  # wherever the loop's clock reads time
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "time"):
            module.time = clock

    def advancing(fn, seconds):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            clock.now += seconds
            return fn(*args, **kwargs)
        return wrapper

    loop.Loop.after_optimizer_step = advancing(loop.Loop.after_optimizer_step, 1.0)
    loop.save_checkpoint = advancing(loop.save_checkpoint, 100.0)
    loop.evaluate = advancing(loop.evaluate, 1000.0)


def record_losses(folder: Path) -> None:
    from shardtrain.loop import Loop

    micro_step = Loop.micro_step

    def recording(self, batch, state):
        loss = micro_step(self, batch, state)
        if loss is not None:
            path = folder / f"rank{self.accelerator.process_index}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps({"step": state.step + 1, "loss": float(loss.detach())}) + "\n")
        return loss

    folder.mkdir(parents=True, exist_ok=True)
    Loop.micro_step = recording


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="emulate.py")
    p.add_argument("--fp16", type=float, default=0.0)
    p.add_argument("--eager-compile", action="store_true")
    p.add_argument("--preempt-at", type=int, default=0)
    p.add_argument("--nan-at", default="")
    p.add_argument("--fake-clock", action="store_true")
    p.add_argument("--record-losses", type=Path)
    args = p.parse_args(argv[:split])
    if args.fp16:
        emulate_fp16(args.fp16)
    if args.eager_compile:
        eager_compile()
    if args.preempt_at:
        preempt_at(args.preempt_at)
    if args.nan_at:
        step, rank = map(int, args.nan_at.split(":"))
        nan_at(step, rank)
    if args.fake_clock:
        fake_clock()
    if args.record_losses:
        record_losses(args.record_losses)
    from shardtrain.cli import main as shardtrain_main

    shardtrain_main(argv[split + 1:])


if __name__ == "__main__":
    main()
