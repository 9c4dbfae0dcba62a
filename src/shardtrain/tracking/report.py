"""Reporter: every rank-0 side effect of training in one place.

On the main process it prints, draws the progress bar, appends to RUN_DIR/metrics.jsonl, logs to
W&B through accelerate's tracker, writes final.json and the plots. On every other rank each
method does nothing (nanochat's DummyWandb idea), so train.py never asks "am I rank 0?".

W&B: the run's mode, init arguments and metric definitions are in wandb_run.py (online with
credentials, else offline; under `wandb agent` the agent's run id is adopted), the dataset and
model artifacts in artifacts.py, the per-layer histograms in histograms.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from shardtrain.tracking.wandb_run import (
    define_metrics,
    init_kwargs,
    run_banner,
    wandb_mode_from_env,
)
from shardtrain.tracking.wandb_log import last_wandb_step


class Reporter:
    """Prints, metrics.jsonl, progress bar, W&B and final files on the main process only."""

    def __init__(self, accelerator, run_dir: Path, total_steps: int, start_step: int):
        self.active = accelerator.is_main_process
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.wandb_on = False
        self.wandb_after = 0  # steps up to here are in the W&B run already (wandb_log.py)
        self.bar = None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        truncate_after(self.metrics_path, start_step)  # a resumed run rewrites from its step on
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr, disable=None)

    def start_wandb(self, cfg, config: dict, run_id: str, data) -> str:
        """One W&B run per job, created here on the main process; resumes by id. Returns the id
        the run really has (the agent's under `wandb agent`), to be stored in the loop State.
        `data` (a train.Data) is the run's input: the dataset artifact."""
        if not (self.active and cfg.log.wandb):
            return run_id
        mode = wandb_mode_from_env()
        if mode == "disabled":
            return run_id
        self.accelerator.init_trackers(cfg.log.project, config=config, init_kwargs={
            "wandb": init_kwargs(cfg, run_id, self.run_dir, mode)})
        run = self.accelerator.get_tracker("wandb", unwrap=True)
        self.wandb_on, self.cfg, self.index_hash = True, cfg, config.get("index_hash", "")
        define_metrics(run)
        self.wandb_after = last_wandb_step(run, self.run_dir / "wandb", mode == "offline")
        for record in read_metrics(self.metrics_path):  # resumed: what W&B lost or never had
            self.send_to_wandb(record["step"], record)
        if cfg.log.artifacts and cfg.data.path:
            self.use_dataset(run, data)
        if run.id != run_id:
            self.print(f"W&B run id {run.id} (assigned by W&B, e.g. `wandb agent`) replaces "
                       f"{run_id} in this run's checkpoints and final.json")
        self.print(run_banner(run, self.run_dir))
        return run.id

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
        self.send_to_wandb(step, metrics)
        if kind == "step" and self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                                 lr=f"{metrics['train/lr']:.2e}")
        if kind == "epoch":
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.print(f"epoch {metrics.get('epoch')} step {step}: {shown}")

    def send_to_wandb(self, step: int, metrics: dict) -> None:
        """accelerator.log at the optimizer step, once: never a step the run already holds."""
        if self.wandb_on and step > self.wandb_after:
            self.accelerator.log({k: v for k, v in metrics.items() if k not in ("kind", "step")},
                                 step=step)  # epoch: the x-axis of val/* charts

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_media(self, step: int, images: dict) -> None:
        """Images/tables (wandb objects built by the caller) to W&B on the main process."""
        if self.active and self.wandb_on:
            self.accelerator.get_tracker("wandb", unwrap=True).log(images, step=step)

    def wants_histograms(self) -> bool:
        return self.active and self.wandb_on and self.cfg.log.histograms

    def gradient_histograms(self, model) -> dict | None:
        """Per-layer gradient histograms now (call between backward and the optimizer step)."""
        if not self.wants_histograms():
            return None
        from shardtrain.tracking.histograms import layer_histograms

        return layer_histograms(model, grads=True)

    def log_histograms(self, step: int, model, gradients: dict | None) -> None:
        """Per-layer parameter histograms (+ the given gradient ones) at `step` (log.histograms)."""
        if not self.wants_histograms():
            return
        import wandb

        from shardtrain.tracking.histograms import layer_histograms

        counts = {**layer_histograms(model), **(gradients or {})}
        self.log_media(step, {k: wandb.Histogram(np_histogram=v) for k, v in counts.items()})

    def finish(self, final: dict) -> None:
        """final.json, W&B summary and model artifact (model.safetensors must be written)."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb_on:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            if self.cfg.log.artifacts:
                final["wandb_model"] = self.log_model(run, final)
            run.summary.update({k: v for k, v in final.items() if not isinstance(v, (list, dict))})
            if not run.offline:
                self.print(run_banner(run, self.run_dir))
        (self.run_dir / "final.json").write_text(json.dumps(final, indent=1) + "\n")

    def use_dataset(self, run, data) -> None:
        """The dataset artifact as the run's input (artifacts.use_dataset); a failure (say, the
        server unreachable while uploading index.json) is a warning, training goes on."""
        from shardtrain.tracking.artifacts import use_dataset

        try:
            use_dataset(run, data)
        except Exception as e:
            self.print(f"warning: W&B dataset artifact not logged: {type(e).__name__}: {e}")

    def log_model(self, run, final: dict) -> str | None:
        """The model artifact (artifacts.log_model); a failure is a warning, not a lost run."""
        from shardtrain.tracking.artifacts import log_model

        try:
            return log_model(run, self.cfg, self.run_dir, final, self.index_hash)
        except Exception as e:  # wandb errors of any kind: final.json must still be written
            self.print(f"warning: W&B model artifact not logged: {type(e).__name__}: {e}")
            return None

    def close(self) -> None:
        if self.active and self.bar is not None:
            self.bar.close()


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (a job killed while appending) is left out."""
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


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
    """eval.json (metrics + confusion matrices); with plots on, the curves, confusion and
    per-layer weights (of model.safetensors) PNGs."""
    (out_dir / "eval.json").write_text(json.dumps({"val": val, "test": test}, indent=1))
    if not plots:
        return
    from safetensors.torch import load_file

    from shardtrain.tracking.histograms import plot_weight_distributions
    from shardtrain.tracking.plots import plot_confusion, plot_curves

    plot_curves(read_metrics(out_dir / "metrics.jsonl"), out_dir / "plots")
    plot_weight_distributions({out_dir.name: load_file(out_dir / "model.safetensors")},
                              out_dir / "plots" / "weights.png")
    last = test or val
    if last:
        plot_confusion(last["confusion"], classes, out_dir / "plots" / "confusion.png")
