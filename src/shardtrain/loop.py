"""Loop: the optimizer-step loop of train(): steps, epoch-end eval, checkpoints, preemption, and
the final evaluation and files.

Step body (accelerate's gradient_accumulation example):
    with accelerator.accumulate(model): forward, backward, clip on sync, optimizer.step()
then, once per optimizer step: scheduler.step(), EMA update, and at boundaries (log steps,
epoch ends, checkpoints, preemption) one finiteness check before anything is logged or saved.
The shard loader is NOT passed to accelerator.prepare (it would re-split or dispatch batches the
plan has already split by rank); batches move to the device in data/batch.py.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object

from shardtrain.checkpoint import save_checkpoint, save_weights
from shardtrain.config import RESUMABLE_CHANGES, config_hash
from shardtrain.data.batch import prepare_batch
from shardtrain.data.index import index_hash
from shardtrain.data.loader import (EVAL, eval_options, make_eval_loader, make_train_loader,
                                    train_options)
from shardtrain.data.mix import mix_for_step
from shardtrain.errors import ExitCode, NonFiniteLoss
from shardtrain.evaluate import (evaluate, ranks_identical, sum_over_ranks, sum_per_node,
                                 sync_bn_stats)
from shardtrain.optim import l1_penalty
from shardtrain.preemption import Preemption
from shardtrain.tracking.report import final_metrics, write_eval_files
from shardtrain.tta import make_tta


@dataclass
class State:
    """Where training is: everything the loop mutates, saved in every checkpoint."""

    step: int = 0  # optimizer steps done (also the data position: see data/plan.py)
    best_val_acc: float = -1.0
    wandb_id: str = field(default_factory=lambda: secrets.token_hex(4))
    skipped_samples: int = 0
    skipped_examples: list = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0
    last_val: dict = field(default_factory=dict)
    fp16_skipped_steps: int = 0  # optimizer steps the fp16 grad scaler skipped (inf/nan grads)
    downloaded_bytes: list = field(default_factory=list)  # per epoch: bytes per node (URLs)


@dataclass
class Window:
    """Start of the current timing window (for images/s and train_seconds)."""

    time: float
    step: int


class Loop:
    """Trains `model` for `total_steps` optimizer steps and evaluates it.

    What it trains:
        model, optimizer: prepared by accelerate; scheduler: not prepared (it steps once per
            optimizer step here, whatever the world size);
        ema: an ema.EMA or None; when set it is what is evaluated and saved.
    How:
        cfg: the resolved Config; accelerator: devices, precision, collectives;
        data: train.Data (index, sample tables, epoch plan, batch options);
        total_steps: optimizer steps of the whole run.
    Where it writes (files on rank 0 only):
        reporter: tracking.report.Reporter (prints, metrics.jsonl, W&B, final.json);
        out_dir: the run folder (checkpoints/, model.safetensors); meta: the metadata stored in
            every weights file (model name, classes, normalisation).
    """

    def __init__(self, cfg, accelerator, data, model, optimizer, scheduler, *, total_steps: int,
                 reporter, meta: dict, out_dir: Path, ema=None):
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.total_steps = total_steps
        self.reporter, self.meta, self.out_dir = reporter, meta, out_dir
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.pin = torch.cuda.is_available()
        self.fp16 = accelerator.mixed_precision == "fp16"
        self.preemption = Preemption()
        self.eval_loaders: dict[int, torch.utils.data.DataLoader] = {}  # made once per split
        self.grad_norm: torch.Tensor | None = None  # measured on the steps that log it
        self.gradient_histograms: dict | None = None  # log.histograms: the epoch's last step
        # the first optimizer step with a non-finite loss (-1: none yet), kept on the device
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=accelerator.device)

    # ---- the loop -------------------------------------------------------------------------
    def run(self, state: State) -> bool:
        """Train until total_steps; True if stopped early by a preemption signal."""
        cfg, acc, plan = self.cfg, self.accelerator, self.data.plan
        options = train_options(cfg.augment, cfg.train.seed, self.data.index.channels,
                                self.data.image_size)
        loader = make_train_loader(
            self.data.train, plan, options, start_micro=state.step * cfg.train.grad_accum,
            end_micro=self.total_steps * cfg.train.grad_accum, workers=cfg.data.workers,
            prefetch=cfg.data.prefetch, pin_memory=self.pin)
        self.set_frozen(state.step // plan.steps_per_epoch)
        self.model.train()
        window = Window(time.perf_counter(), state.step)
        for batch in loader:
            loss = self.micro_step(batch, state)
            if not acc.sync_gradients:
                continue
            lr = self.scheduler.get_last_lr()[0]  # the lr this step used
            self.after_optimizer_step(state, loss)
            last = state.step == self.total_steps
            logging = state.step % cfg.train.log_every == 0 or last
            preempted = self.preemption.agreed(acc, state.step)
            epoch_end = state.step % plan.steps_per_epoch == 0 or last
            periodic = bool(cfg.train.checkpoint_every
                            and state.step % cfg.train.checkpoint_every == 0)
            if logging or preempted or epoch_end or periodic:
                self.check_finite()  # nothing is logged or saved past a non-finite loss
            if logging:
                self.log_step(state, loss, lr, window)
            if preempted:
                self.save(state)
                self.reporter.print(f"preempted: checkpoint at step {state.step}, exiting "
                                    f"{int(ExitCode.PREEMPTED)} to be requeued")
                self.reporter.close()
                return True
            if epoch_end:
                self.end_of_epoch(state, window)
            elif periodic:
                self.save(state)
        return False

    def after_optimizer_step(self, state: State, loss: torch.Tensor) -> None:
        """Schedule, EMA and counters, once per optimizer step (no CPU-GPU sync)."""
        acc = self.accelerator
        self.scheduler.step()
        state.step += 1
        if self.ema is not None:  # same weights on every rank: update from the unwrapped model
            self.ema.update(acc.unwrap_model(self.model))
        state.images_seen += self.cfg.data.batch_size
        if self.fp16:  # the grad scaler skips overflowing steps by design: count them
            state.fp16_skipped_steps += int(acc.optimizer_step_was_skipped)
        else:  # remember the first non-finite step without a CPU-GPU sync
            bad = (self.first_bad_step < 0) & ~torch.isfinite(loss.detach())
            step = torch.full_like(self.first_bad_step, state.step)
            self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.reporter.advance()

    def micro_step(self, batch: dict, state: State) -> torch.Tensor:
        cfg, acc = self.cfg, self.accelerator
        if batch["skipped"]:
            state.skipped_samples += len(batch["skipped"])
            state.skipped_examples = (state.skipped_examples + batch["skipped"])[:20]
            self.reporter.print(f"skipped corrupt sample(s): {'; '.join(batch['skipped'][:3])}")
        x, y = prepare_batch(batch, acc.device, self.data.batch_opts, train=True)
        if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:  # y: soft targets (B, K)
            x, y = mix_for_step(x, y, batch["ids"], cfg.augment, seed=cfg.train.seed,
                                step=state.step, num_classes=len(self.data.index.classes))
        with acc.accumulate(self.model):
            loss = self.criterion(self.model(x), y)
            if cfg.optim.l1:
                loss = loss + cfg.optim.l1 * l1_penalty(acc.unwrap_model(self.model))
            acc.backward(loss)
            if acc.sync_gradients:
                self.clip(state)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def clip(self, state: State) -> None:
        o, params = self.cfg.optim, self.model.parameters()
        next_step = state.step + 1
        if self.cfg.log.histograms and (next_step % self.data.plan.steps_per_epoch == 0
                                        or next_step == self.total_steps):  # an epoch's end
            self.gradient_histograms = self.reporter.gradient_histograms(
                self.accelerator.unwrap_model(self.model))  # rank 0, before clipping
        if o.clip_value:
            self.accelerator.clip_grad_value_(params, o.clip_value)
        logging = next_step % self.cfg.train.log_every == 0 or next_step == self.total_steps
        if o.clip_norm or logging:  # clip_norm=inf only measures (multiplies by exactly 1)
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                    o.clip_norm or float("inf"))
            self.grad_norm = norm

    def check_finite(self) -> None:
        bad = int(self.first_bad_step.item())  # note: CPU-GPU sync point, only at boundaries
        if bad >= 0:
            raise NonFiniteLoss(
                f"non-finite loss at optimizer step {bad}: stopping; the last checkpoint in "
                f"{self.out_dir / 'checkpoints'} is from before it (lower optim.max_lr or add "
                f"optim.clip_norm)")

    def log_step(self, state: State, loss: torch.Tensor, lr: float, window: Window) -> None:
        now = time.perf_counter()
        steps = state.step - window.step
        images_per_sec = steps * self.cfg.data.batch_size / max(now - window.time, 1e-9)
        norm = self.grad_norm
        self.reporter.log("step", state.step, {
            "epoch": state.step / self.data.plan.steps_per_epoch,
            "train/loss": float(loss.item()),  # note: CPU-GPU sync point
            "train/lr": lr,
            "train/images_per_sec": images_per_sec,
            "train/grad_norm": float(norm) if norm is not None else float("nan"),
        })
        state.train_seconds += now - window.time
        window.time, window.step = now, state.step

    # ---- epoch ends, checkpoints ------------------------------------------------------------
    def end_of_epoch(self, state: State, window: Window) -> None:
        cfg = self.cfg
        state.train_seconds += time.perf_counter() - window.time
        epoch = math.ceil(state.step / self.data.plan.steps_per_epoch)
        sync_bn_stats(self.model, self.accelerator)
        if self.data.val is not None and (epoch % cfg.train.eval_every == 0
                                          or state.step == self.total_steps):
            val = self.eval_split(self.data.val)
            state.last_val = val
            if cfg.optim.schedule == "plateau":  # lr_plateau.PlateauLR steps at evaluations
                self.scheduler.observe(val["loss"])
            self.reporter.log("epoch", state.step, {
                "epoch": epoch, "val/loss": val["loss"], "val/acc": val["acc"],
                "val/top5": val["top5"]})
            if val["acc"] > state.best_val_acc:
                state.best_val_acc = val["acc"]
                if self.accelerator.is_main_process:
                    (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                    save_weights(self.out_dir / "checkpoints" / "best.safetensors",
                                 self.eval_state(), self.meta)
        self.log_downloads(state, epoch)
        self.reporter.log_histograms(state.step, self.accelerator.unwrap_model(self.model),
                                     self.gradient_histograms)  # log.histograms, rank 0
        self.save(state)
        self.set_frozen(epoch)
        window.time, window.step = time.perf_counter(), state.step

    def log_downloads(self, state: State, epoch: int) -> None:
        """Bytes each node downloaded for this epoch's shards (a collective; URLs only)."""
        counts, plan = self.data.train.downloads, self.data.plan
        if counts is None:
            return
        per_node = sum_per_node(counts.take(epoch - 1), plan.node, plan.nodes, self.accelerator)
        state.downloaded_bytes.append(per_node)
        self.reporter.log("data", state.step, {
            "epoch": epoch, "data/downloaded_bytes": sum(per_node),
            **{f"data/downloaded_bytes/node{n}": b for n, b in enumerate(per_node)}})

    def eval_split(self, table, model=None, transform=None) -> dict:
        options = eval_options(self.data.index.channels, self.data.image_size)
        if id(table) not in self.eval_loaders:  # made once; its workers persist across epochs
            self.eval_loaders[id(table)] = make_eval_loader(
                table, options, world_size=self.accelerator.num_processes,
                rank=self.accelerator.process_index,
                batch_size=self.data.plan.batch_per_device * 2, workers=self.cfg.data.workers,
                pin_memory=self.pin, persistent=True)
        loader = self.eval_loaders[id(table)]
        model = model if model is not None else self.eval_model()
        return evaluate(model, loader, self.accelerator,
                        self.data.batch_opts, len(self.data.index.classes), transform=transform)

    def eval_model(self) -> torch.nn.Module:
        """What is evaluated and saved as the run's model: the EMA when enabled."""
        if self.ema is None:
            return self.accelerator.unwrap_model(self.model)
        sync_bn_stats(self.ema.module, self.accelerator)  # EMA of BN buffers differs per rank
        return self.ema.module

    def eval_state(self) -> dict:
        """No collective (rank 0 only calls it): EMA BN buffers were synced by the last eval."""
        return self.model_state() if self.ema is None else self.ema.module.state_dict()

    def extra_evals(self) -> dict:
        """final.json extras: plain-model accuracy when EMA is on (*_acc_raw), TTA (*_acc_tta)."""
        extra = {}
        if self.ema is not None:  # also without val/test: the saved EMA gets averaged BN stats
            sync_bn_stats(self.ema.module, self.accelerator)
        for name, table in (("val", self.data.val), ("test", self.data.test)):
            if table is None:
                continue
            if self.ema is not None:
                raw = self.accelerator.unwrap_model(self.model)
                extra[f"{name}_acc_raw"] = self.eval_split(table, model=raw)["acc"]
            if self.cfg.train.tta != "none":
                tta = make_tta(self.cfg.train.tta)
                extra[f"{name}_acc_tta"] = self.eval_split(table, transform=tta)["acc"]
        return extra

    def set_frozen(self, epoch: int) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if self.cfg.model.freeze_epochs and hasattr(model, "backbone"):
            from shardtrain.models.transfer import set_backbone_trainable

            set_backbone_trainable(model, epoch >= self.cfg.model.freeze_epochs)

    def model_state(self) -> dict:
        return self.accelerator.get_state_dict(self.model)

    def save(self, state: State) -> None:
        """Complete checkpoint: rank 0 writes, every rank contributes its RNG state."""
        acc = self.accelerator
        sync_bn_stats(self.model, acc)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rng_states = gather_object([rng]) if acc.num_processes > 1 else [rng]
        model_state = self.model_state()
        if self.ema is not None:  # checkpoint: model + EMA tensors under the `ema.` prefix
            sync_bn_stats(self.ema.module, acc)
            model_state.update(self.ema.state_dict())
        if acc.is_main_process:
            optim = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
            trainer = {"step": state.step, "world_size": acc.num_processes,
                       "index_hash": index_hash(self.cfg.data.path),
                       "config_hash": config_hash(self.cfg, RESUMABLE_CHANGES),
                       "config": asdict(self.cfg),
                       "state": asdict(state)}
            save_checkpoint(self.out_dir / "checkpoints", state.step, model_state=model_state,
                            meta=self.meta, optim_state=optim, rng_states=rng_states,
                            trainer=trainer, keep=self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()

    # ---- the end ------------------------------------------------------------------------------
    def finish(self, state: State) -> dict:
        acc = self.accelerator
        sync_bn_stats(self.model, acc)
        val = state.last_val or (self.eval_split(self.data.val) if self.data.val else {})
        test = self.eval_split(self.data.test) if self.data.test is not None else {}
        extra = self.extra_evals()
        if acc.is_main_process:
            save_weights(self.out_dir / "model.safetensors", self.eval_state(), self.meta)
        final = final_metrics(state, val, test, acc.num_processes, self.out_dir, self.data.plan)
        final.update(extra)
        weights = acc.unwrap_model(self.model).state_dict()
        if self.ema is not None:
            weights.update(self.ema.state_dict())
        final["ranks_identical"] = ranks_identical(weights, acc)
        final["skipped_samples"] = sum_over_ranks(state.skipped_samples, acc)
        if self.data.train.downloads is not None:  # shards behind URLs: egress per epoch
            final["downloaded_bytes_per_epoch"] = state.downloaded_bytes
            final["eval_downloaded_bytes"] = sum_over_ranks(
                sum(t.downloads.take(EVAL) for t in (self.data.val, self.data.test) if t), acc)
        self.reporter.finish(final)
        if acc.is_main_process:
            write_eval_files(self.out_dir, val, test, self.data.index.classes, self.cfg.log.plots)
        if self.reporter.wandb_on:  # main process only: a local forward, no collective
            from shardtrain.tracking.media import final_media

            self.reporter.log_media(state.step, final_media(self, self.total_steps, test or val))
        self.eval_loaders.clear()  # stop their persistent workers now, not at interpreter exit
        acc.wait_for_everyone()  # else a rank can die at exit and leave the other waiting
        acc.end_training()
        return final

