"""`make test-gpu`: check shardtrain on this machine's CUDA GPUs (at most ~8 minutes), print a
table and write bench/results/gpu_check.json.

    make test-gpu                               # = .venv/bin/python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --dry-run --data DIR --set data.batch_size=32
        # the same checks, tiny and on CPU (tests/test_gpu_check.py runs this)

Without a CUDA GPU (and without --dry-run) it prints one line and exits 0. Every check is a
real `shardtrain train` run of the default recipe (fashion-mnist-resnet9) on the committed demo
shards (shards/fashion-mnist-12k), or a bare PyTorch loop where the check is about the GPU:
  auto          what train.precision=auto picks on this GPU (and whether bf16 is native)
  fp16, bf16    a few hundred steps with clip_value 0.1 and clip_norm 1.0: finishes, test
                accuracy, fp16 steps skipped by the grad scaler, resnet9 img/s (median of the
                logged train/images_per_sec over the last three quarters of the run)
  channels_last img/s with model.channels_last=false vs the recipe's true
  compile       train.compile=true, preempted (SIGUSR1) and resumed: finishes, plain weights
                that `shardtrain eval` loads, img/s vs eager
  pinned        the loader's batches are in pinned memory; prepare_batch's non_blocking copies
                give the same tensors as blocking ones
  bitwise       preempted (SIGUSR1) + resumed vs uninterrupted: identical weights? (if not,
                a second uninterrupted run tells a resume bug from nondeterministic kernels)
  ddp_sync_bn   2+ GPUs: 2 processes, NCCL, model.sync_bn=true; ranks_identical
  resnet50      224 px synthetic batches, bare loop, fp16 (GradScaler) and bf16: img/s
Exit code 1 if a check failed (a skipped check is not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shardtrain.tracking.report import read_metrics  # skips a torn last line: runs still write

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "shards" / "fashion-mnist-12k"
BUDGET_S = 7 * 60  # checks not started by then are reported as skipped; runs stop by 8 min


class Suite:
    """Runs `shardtrain train` variants on one device kind (cuda, or cpu for --dry-run)."""

    def __init__(self, data: Path, work: Path, dry_run: bool, extra: list[str], deadline: float):
        self.data, self.work, self.dry_run = data, work, dry_run
        self.deadline = deadline  # time.time() by which every run must have ended
        self.cuda = not dry_run
        self.steps = 24 if dry_run else 300  # optimizer steps of the main runs
        self.common = ["--recipe", "fashion-mnist-resnet9", "--data", str(data),
                       "log.wandb=false", "log.plots=false", "train.log_every=1" if dry_run
                       else "train.log_every=10", f"data.workers={1 if dry_run else 4}", *extra]
        self.env = {**os.environ, "WANDB_MODE": "disabled"}
        if dry_run:
            self.env["ACCELERATE_USE_CPU"] = "1"
        self.auto = "bf16" if dry_run else "auto"  # what precision=auto picks (check_auto)
        self.runs: dict[str, dict] = {}  # final.json (+ steady img/s) of finished runs

    # ---- running shardtrain ------------------------------------------------------------
    def command(self, out: Path, args: list[str], nproc: int = 1) -> list[str]:
        train = ["-m", "shardtrain", "train", "--out", str(out), *self.common, *args]
        if nproc == 1:
            return [sys.executable, *train]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29613", *train]

    def train(self, name: str, args: list[str], nproc: int = 1, resume: bool = False) -> dict:
        """Run to the end; final.json plus `steady_images_per_sec`. RuntimeError on failure."""
        out = self.work / name
        cmd = self.command(out, args + (["--resume", "auto"] if resume else []), nproc)
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                           timeout=self.seconds_left())
        if r.returncode != 0:
            raise RuntimeError(f"{name}: exit {r.returncode}: {last_line(r.stderr)}")
        final = json.loads((out / "final.json").read_text())
        final["steady_images_per_sec"] = steady_rate(out / "metrics.jsonl")
        final["output"] = r.stdout + r.stderr
        self.runs[name] = final
        return final

    def preempt(self, name: str, args: list[str], at_step: int) -> int:
        """Start a run, send SIGUSR1 once step `at_step` is logged; the checkpoint's step."""
        out = self.work / name
        proc = subprocess.Popen(self.command(out, args), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + self.seconds_left()
        while logged_step(out / "metrics.jsonl") < at_step:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{name}: ended before step {at_step}: "
                                   f"{last_line(proc.communicate()[1])}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=self.seconds_left())
        if proc.returncode != 75:
            raise RuntimeError(f"{name}: exit {proc.returncode} after SIGUSR1, not 75: "
                               f"{last_line(err)}")
        return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))

    def seconds_left(self) -> float:
        return max(self.deadline - time.time(), 30.0)

    # ---- the checks --------------------------------------------------------------------
    def check_auto(self) -> tuple[bool, str, dict]:
        if self.dry_run:
            return True, "dry run: bf16 assumed", {"picked": "bf16"}
        from shardtrain.train import resolve_precision

        props = torch.cuda.get_device_properties(0)
        self.auto = resolve_precision("auto", cuda=True)
        figures = {"picked": self.auto, "gpu": props.name, "capability": f"{props.major}."
                   f"{props.minor}", "bf16_incl_emulation": torch.cuda.is_bf16_supported()}
        return True, f"{self.auto} on {props.name} (sm {figures['capability']})", figures

    def check_precision(self, precision: str) -> tuple[bool | None, str, dict]:
        if precision == "fp16" and not self.cuda:
            return None, "needs CUDA (tests/test_gpu_paths.py emulates it on CPU)", {}
        if precision == "bf16" and self.cuda and torch.cuda.get_device_properties(0).major < 8:
            return None, "no native bf16 on this GPU", {}
        final = self.train(precision, [f"train.precision={precision}", "optim.clip_norm=1.0",
                                       f"train.max_steps={self.steps}"])
        figures = pick(final, "test_acc", "fp16_skipped_steps", "steady_images_per_sec",
                       "images_per_second", "train_seconds")
        ok = final["steps"] == self.steps and (self.dry_run or final["test_acc"] > 0.8)
        return ok, (f"test_acc {final['test_acc']:.4f}, {final['fp16_skipped_steps']} skipped "
                    f"steps, resnet9 {final['steady_images_per_sec']:.0f} img/s"), figures

    def auto_run(self) -> dict:
        """The fp16/bf16 run of what auto picks (run now if that check was skipped)."""
        name = self.auto
        if name not in self.runs:
            self.train(name, [f"train.precision={name}", "optim.clip_norm=1.0",
                              f"train.max_steps={self.steps}"])
        return self.runs[name]

    def check_channels_last(self) -> tuple[bool, str, dict]:
        base = self.auto_run()
        off = self.train("nchw", [f"train.precision={self.auto}", "optim.clip_norm=1.0",
                                  f"train.max_steps={self.steps}", "model.channels_last=false"])
        ratio = base["steady_images_per_sec"] / off["steady_images_per_sec"]
        return True, f"channels_last / NCHW img/s: {ratio:.2f}x", {
            "channels_last": base["steady_images_per_sec"], "nchw": off["steady_images_per_sec"],
            "ratio": ratio}

    def check_compile(self) -> tuple[bool | None, str, dict]:
        if self.dry_run:
            return None, "dry run: inductor compiles for minutes on CPU", {}
        args = [f"train.precision={self.auto}", "train.compile=true", "train.max_steps=120"]
        at = self.preempt("compiled", args, 60)
        final = self.train("compiled", args, resume=True)
        from safetensors.torch import load_file

        keys = load_file(self.work / "compiled" / "model.safetensors").keys()
        plain = not any("_orig_mod" in k for k in keys)
        ev = subprocess.run([sys.executable, "-m", "shardtrain", "eval", "--checkpoint",
                             str(self.work / "compiled"), "--data", str(self.data)],
                            env=self.env, capture_output=True, text=True,
                            timeout=self.seconds_left())
        eager = self.auto_run()["steady_images_per_sec"]
        ratio = final["steady_images_per_sec"] / eager
        ok = final["steps"] == 120 and plain and ev.returncode == 0
        return ok, (f"resumed from {at}, plain keys {plain}, eval exit {ev.returncode}, "
                    f"compiled / eager img/s {ratio:.2f}x"), {
            "resumed_from": at, "plain_keys": plain, "eval_exit": ev.returncode,
            "compiled_images_per_sec": final["steady_images_per_sec"], "ratio": ratio}

    def check_pinned(self) -> tuple[bool | None, str, dict]:
        if not self.cuda:
            return None, "needs CUDA (the loader pins only for a GPU)", {}
        return check_pinned_batches(self.data)

    def check_bitwise(self) -> tuple[bool | None, str, dict]:
        """Preempted + resumed vs uninterrupted. When they differ, a second uninterrupted run
        tells a resume bug from GPU kernels that are not deterministic run to run (several
        cuDNN/atomicAdd backward kernels are not, unless torch is told to avoid them)."""
        steps = self.steps if self.dry_run else 80
        args = [f"train.precision={self.auto}", f"train.max_steps={steps}"]
        self.train("whole", args)
        at = self.preempt("resumed", args, 2 if self.dry_run else 30)
        self.train("resumed", args, resume=True)
        diff = max_weight_diff(self.work / "whole", self.work / "resumed")
        figures = {"resumed_from": at, "max_abs_diff": diff}
        if diff == 0.0:
            return True, f"resumed from step {at}: weights bitwise identical", figures
        self.train("whole_again", args)
        noise = figures["rerun_max_abs_diff"] = max_weight_diff(self.work / "whole",
                                                                self.work / "whole_again")
        if noise == 0.0:
            return False, f"resumed from step {at}: max |weight diff| {diff:.3g}, while two " \
                          f"uninterrupted runs are identical", figures
        return None, f"inconclusive: two uninterrupted runs already differ (max {noise:.3g}; " \
                     f"resumed: {diff:.3g})", figures

    def check_ddp(self) -> tuple[bool | None, str, dict]:
        if self.cuda and torch.cuda.device_count() < 2:
            return None, f"needs 2+ GPUs ({torch.cuda.device_count()} here)", {}
        final = self.train("ddp2", [f"train.precision={self.auto}", "model.sync_bn=true",
                                    f"train.max_steps={self.steps // 2}"], nproc=2)
        ignored = "sync_bn=true is ignored" in final["output"]
        ok = final["world_size"] == 2 and final["ranks_identical"] and ignored != self.cuda
        backend = "NCCL + SyncBatchNorm" if self.cuda else "gloo, sync_bn ignored on CPU"
        return ok, f"{backend}: ranks identical {final['ranks_identical']}, " \
                   f"{final['steady_images_per_sec']:.0f} img/s", pick(
            final, "ranks_identical", "steady_images_per_sec", "test_acc")

    def check_resnet50(self, precision: str) -> tuple[bool | None, str, dict]:
        if precision == "fp16" and not self.cuda:
            return None, "needs CUDA", {}
        rate = bare_throughput(precision, self.cuda)
        return True, f"{rate:.0f} img/s (224 px, batch 128, channels_last)" if self.cuda else \
            f"{rate:.1f} img/s (dry run: 32 px, batch 4)", {"images_per_sec": rate}


# ---- pieces without state -----------------------------------------------------------------
def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else ""


def logged_step(path: Path) -> int:
    steps = [r["step"] for r in read_metrics(path) if r.get("kind") == "step"]
    return steps[-1] if steps else -1


def steady_rate(path: Path) -> float:
    """Median train/images_per_sec of the logged steps after the first quarter (compile and
    warm-up excluded)."""
    rates = [r["train/images_per_sec"] for r in read_metrics(path) if r.get("kind") == "step"]
    rates = sorted(rates[len(rates) // 4:]) or [float("nan")]
    return float(rates[len(rates) // 2])


def pick(d: dict, *keys: str) -> dict:
    return {k: d.get(k) for k in keys}


def max_weight_diff(run_a: Path, run_b: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
               for k in a)


def check_pinned_batches(data: Path) -> tuple[bool, str, dict]:
    from shardtrain.config import load_config
    from shardtrain.data.batch import BatchOptions, prepare_batch
    from shardtrain.data.index import load_index, sample_table
    from shardtrain.data.loader import make_train_loader, train_options
    from shardtrain.data.plan import TrainPlan

    cfg = load_config("fashion-mnist-resnet9")
    index = load_index(data)
    table = sample_table(index, "train")
    plan = TrainPlan(tuple(s["num_samples"] for s in index.split("train").shards), 256, 1, 0, 1,
                     0, 4)
    options = train_options(cfg.augment, 0, index.channels, max(index.image_size))
    loader = make_train_loader(table, plan, options, start_micro=0, end_micro=2, workers=2,
                               prefetch=2, pin_memory=True)
    batch = next(iter(loader))
    pinned = all(batch[k].is_pinned() for k in ("images", "labels", "offsets"))
    opts = BatchOptions(torch.tensor(index.mean), torch.tensor(index.std), "standardize",
                        cfg.augment.pad_crop, True)
    device = torch.device("cuda")
    x, y = prepare_batch(batch, device, opts, train=True)  # non_blocking from pinned memory
    unpinned = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    x_ref, y_ref = prepare_batch(unpinned, device, opts, train=True)  # pageable: synchronous
    torch.cuda.synchronize()
    same = torch.equal(x, x_ref) and torch.equal(y, y_ref)
    return pinned and same, f"pinned {pinned}, non_blocking copies equal {same}", {
        "pinned": pinned, "equal": same}


def bare_throughput(precision: str, cuda: bool, steps: int = 30) -> float:
    """img/s of forward + backward + SGD step of resnet50 on random 224 px images."""
    from shardtrain.models import create_model

    device = torch.device("cuda" if cuda else "cpu")
    size, batch = (224, 128) if cuda else (32, 4)
    steps = steps if cuda else 2
    model = create_model("resnet50", 1000, 3).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for _ in range(steps + 5):  # 5 warm-up steps (cuDNN autotuning, allocator)
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return steps * batch / (times[-1] - times[4])


def format_table(rows: list[dict]) -> str:
    """A markdown table: check | result | details."""
    mark = {True: "ok", False: "FAILED", None: "skipped"}
    lines = ["| check | result | details |", "|---|---|---|"]
    lines += [f"| {r['check']} | {mark[r['ok']]} | {r['summary']} |" for r in rows]
    return "\n".join(lines)


def run_checks(suite: Suite, started: float, budget: float) -> list[dict]:
    checks = [("auto", suite.check_auto), ("fp16", lambda: suite.check_precision("fp16")),
              ("bf16", lambda: suite.check_precision("bf16")),
              ("channels_last", suite.check_channels_last), ("compile", suite.check_compile),
              ("pinned", suite.check_pinned), ("bitwise", suite.check_bitwise),
              ("ddp_sync_bn", suite.check_ddp),
              ("resnet50_fp16", lambda: suite.check_resnet50("fp16")),
              ("resnet50_bf16", lambda: suite.check_resnet50("bf16"))]
    rows = []
    for name, check in checks:
        if time.time() - started > budget:
            rows.append({"check": name, "ok": None, "summary": "time budget spent", "figures": {}})
            continue
        try:
            ok, summary, figures = check()
        except Exception as e:  # a failed check is reported, the others still run
            ok, summary, figures = False, f"{type(e).__name__}: {e}"[:300], {}
        rows.append({"check": name, "ok": ok, "summary": summary, "figures": figures})
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny runs on CPU (tests the script)")
    p.add_argument("--data", type=Path, default=DEMO, help="shards (default: the demo shards)")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value",
                   help="extra override for every training run (repeatable)")
    p.add_argument("--json", type=Path, default=HERE / "results" / "gpu_check.json")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds after which no check starts (runs are cut 60 s later)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("make test-gpu: no CUDA GPU here (torch.cuda.is_available() is False): "
              "nothing checked")
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        suite = Suite(args.data, Path(work), args.dry_run, args.set, started + args.budget + 60)
        rows = run_checks(suite, started, args.budget)
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if suite.cuda else [])
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "gpus": gpus,
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "seconds": round(time.time() - started, 1), "checks": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{', '.join(gpus) or 'CPU (dry run)'}; torch {torch.__version__}; "
          f"{report['seconds']:.0f} s\n{format_table(rows)}\nwrote {args.json}")
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
