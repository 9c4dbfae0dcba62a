"""Reporter: every rank-0 side effect of training in one place.

On the main process it prints, draws the progress bar, appends to RUN_DIR/metrics.jsonl, logs to
W&B through accelerate's tracker, writes final.json and the plots. On every other rank each
method does nothing (nanochat's DummyWandb idea), so train.py never asks "am I rank 0?".

W&B mode: the environment decides (WANDB_MODE=online|offline|disabled). Without WANDB_MODE and
without credentials the run is made offline rather than blocking on a login prompt; `wandb sync
RUN_DIR/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def wandb_mode_from_env() -> str:
    """'online' with credentials, else 'offline', unless WANDB_MODE says otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if any(host.endswith("wandb.ai") for host in rc.hosts):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Reporter:
    """Prints, metrics.jsonl, progress bar, W&B and final files on the main process only."""

    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int):
        self.active = accelerator.is_main_process
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.wandb_on = False
        self.bar = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        truncate_after(self.metrics_path, start_step)  # a resumed run rewrites from its step on
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr, disable=None)

    def start_wandb(self, cfg, config: dict, run_id: str) -> None:
        """One W&B run per job, created here on the main process; resumes by id."""
        if not (self.active and cfg.log.wandb):
            return
        import wandb

        mode = wandb_mode_from_env()
        if mode == "disabled":
            return
        kwargs = {
            "id": run_id, "resume": "allow", "dir": str(self.run_dir), "mode": mode,
            "name": cfg.log.name or f"{Path(cfg.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}",
            "group": cfg.log.group or Path(cfg.recipe).stem, "tags": cfg.log.tags,
            "job_type": cfg.log.job_type, "entity": cfg.log.entity or None,
            "settings": wandb.Settings(init_timeout=10, silent=True),
        }
        self.accelerator.init_trackers(cfg.log.project, config=config,
                                       init_kwargs={"wandb": kwargs})
        self.wandb_on = True
        self.print(f"W&B run {run_id} ({mode}) in {self.run_dir / 'wandb'}")

    def print(self, message: str) -> None:
        if self.active:
            tqdm.write(message, file=sys.stderr if self.bar else sys.stdout)

    def log(self, kind: str, step: int, metrics: dict) -> None:
        """Append a record to metrics.jsonl and log it to W&B at `step` (the optimizer step)."""
        if not self.active:
            return
        record = {"kind": kind, "step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_on:
            self.accelerator.log({k: v for k, v in metrics.items() if k != "epoch"}, step=step)
        if kind == "step" and self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                                 lr=f"{metrics['train/lr']:.2e}")
        if kind == "epoch":
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.print(f"epoch {metrics.get('epoch')} step {step}: {shown}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_media(self, step: int, images: dict) -> None:
        """Images/tables (wandb objects built by the caller) to W&B on the main process."""
        if self.active and self.wandb_on:
            self.accelerator.get_tracker("wandb", unwrap=True).log(images, step=step)

    def finish(self, final: dict) -> None:
        """final.json, W&B summary, plots; closes the bar and the W&B run."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        (self.run_dir / "final.json").write_text(json.dumps(final, indent=1) + "\n")
        if self.wandb_on:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.summary.update({k: v for k, v in final.items() if not isinstance(v, (list, dict))})

    def close(self) -> None:
        if self.active and self.bar is not None:
            self.bar.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop records logged after `step` (written before a crash, logged again on resume)."""
    records = read_metrics(path)
    kept = [r for r in records if r["step"] <= step] if step else []
    if len(kept) != len(records) or (not step and path.exists()):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def final_metrics(state, val: dict, test: dict, world_size: int, out_dir: Path,
                  plan) -> dict:
    """final.json: the run's summary from the loop State and the last val/test evaluations."""
    final = {
        "val_acc": val.get("acc"), "val_loss": val.get("loss"), "val_top5": val.get("top5"),
        "val_samples": val.get("samples", 0), "best_val_acc": max(state.best_val_acc, 0.0),
        "epochs": round(state.step / plan.steps_per_epoch, 3), "steps": state.step,
        "world_size": world_size, "train_seconds": round(state.train_seconds, 2),
        "images_per_second": round(state.images_seen / max(state.train_seconds, 1e-9), 1),
        "skipped_samples": state.skipped_samples, "skipped_examples": state.skipped_examples,
        "fp16_skipped_steps": state.fp16_skipped_steps,
        "wandb_run_id": state.wandb_id, "run_dir": str(out_dir),
    }
    if test:
        final.update({"test_acc": test["acc"], "test_loss": test["loss"],
                      "test_top5": test["top5"], "test_samples": test["samples"],
                      "test_skipped": test["skipped"]})
    if val:
        final["val_skipped"] = val["skipped"]
    return final


def write_eval_files(out_dir: Path, val: dict, test: dict, classes: list, plots: bool) -> None:
    """eval.json (metrics + confusion matrices); with plots on, the curves and confusion PNGs."""
    (out_dir / "eval.json").write_text(json.dumps({"val": val, "test": test}, indent=1))
    if not plots:
        return
    from shardtrain.tracking.plots import plot_confusion, plot_curves

    plot_curves(read_metrics(out_dir / "metrics.jsonl"), out_dir / "plots")
    last = test or val
    if last:
        plot_confusion(last["confusion"], classes, out_dir / "plots" / "confusion.png")
