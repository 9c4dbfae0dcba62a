"""The optimizer-step loop of train(): steps, epoch-end eval, checkpoints, preemption, final files.

Step body (accelerate's gradient_accumulation example):
    with accelerator.accumulate(model): forward, backward, clip on sync, optimizer.step()
then, once per optimizer step: scheduler.step(), logging, preemption check, checkpoints.
The shard loader is NOT passed to accelerator.prepare (it would re-split or dispatch batches the
plan has already split by rank); batches are moved to the device in batch.prepare_batch.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object

from shardtrain.batch import prepare_batch
from shardtrain.checkpoint import save_checkpoint, save_weights
from shardtrain.config import config_hash
from shardtrain.data.index import index_hash
from shardtrain.data.loader import make_eval_loader, make_train_loader, options_from_config
from shardtrain.evaluate import evaluate, sync_bn_stats
from shardtrain.mix import mix_for_step
from shardtrain.optim import l1_penalty
from shardtrain.preemption import PREEMPTED_EXIT, Preemption
from shardtrain.report import final_metrics, write_eval_files
from shardtrain.tta import make_tta

@dataclass
class State:
    """Where training is: everything the loop mutates, saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    best_val_acc: float = -1.0
    wandb_id: str = field(default_factory=lambda: secrets.token_hex(4))
    skipped_samples: int = 0
    skipped_examples: list = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0
    last_val: dict = field(default_factory=dict)
    fp16_skipped_steps: int = 0  # optimizer steps the fp16 grad scaler skipped (inf/nan grads)


class NonFiniteLoss(RuntimeError):
    pass


class Loop:
    def __init__(self, cfg, accelerator, data, model, optimizer, scheduler, reporter, meta,
                 out_dir: Path, ema=None):
        self.ema = ema  # ema.EMA or None: evaluated and saved instead of the model when set
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.reporter, self.meta, self.out_dir = reporter, meta, out_dir
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.pin = torch.cuda.is_available()
        self.eval_loaders = {}
        self.fp16 = accelerator.mixed_precision == "fp16"
        self.preemption = Preemption()

    # ---- the loop -------------------------------------------------------------------------
    def run(self, state: State, total_steps: int) -> bool:
        """Train until total_steps; True if stopped early by a preemption signal."""
        cfg, acc, plan = self.cfg, self.accelerator, self.data.plan
        self.total_steps = total_steps
        options = options_from_config(cfg, self.data.index.channels, self.data.image_size, True)
        loader = make_train_loader(
            self.data.train, plan, options, start_micro=state.step * cfg.train.grad_accum,
            end_micro=total_steps * cfg.train.grad_accum, workers=cfg.data.workers,
            prefetch=cfg.data.prefetch, pin_memory=self.pin)
        self.set_frozen(state.step // plan.steps_per_epoch)
        self.model.train()
        window = Window(time.perf_counter(), state.step)
        first_bad = torch.full((), -1, dtype=torch.long, device=acc.device)
        for batch in loader:
            loss = self.micro_step(batch, state)
            if not acc.sync_gradients:
                continue
            lr = self.scheduler.get_last_lr()[0]  # the lr this step used
            self.scheduler.step()
            state.step += 1
            if self.ema is not None:  # same weights on every rank: update from the unwrapped model
                self.ema.update(acc.unwrap_model(self.model))
            state.images_seen += cfg.data.batch_size
            if self.fp16:  # the grad scaler skips overflowing steps by design: count them
                state.fp16_skipped_steps += int(acc.optimizer_step_was_skipped)
            else:  # remember the first non-finite step without a CPU-GPU sync
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()),
                                        torch.full_like(first_bad, state.step), first_bad)
            self.reporter.advance()
            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                self.check_finite(first_bad, state)
                self.log_step(state, loss, lr, window)
            if self.preemption.agreed(acc, state.step):
                self.check_finite(first_bad, state)
                self.save(state)
                self.reporter.print(f"preempted: checkpoint at step {state.step}, exiting "
                                    f"{PREEMPTED_EXIT} to be requeued")
                self.reporter.close()
                return True
            if state.step % plan.steps_per_epoch == 0 or state.step == total_steps:
                self.check_finite(first_bad, state)
                self.end_of_epoch(state, total_steps, window)
            elif cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                self.check_finite(first_bad, state)
                self.save(state)
        return False

    def micro_step(self, batch: dict, state: State) -> torch.Tensor:
        cfg, acc = self.cfg, self.accelerator
        if batch["skipped"]:
            state.skipped_samples += len(batch["skipped"])
            state.skipped_examples = (state.skipped_examples + batch["skipped"])[:20]
            self.reporter.print(f"skipped corrupt sample(s): {'; '.join(batch['skipped'][:3])}")
        x, y = prepare_batch(batch, acc.device, self.data.batch_opts, train=True)
        if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:  # y: soft targets (B, K)
            x, y = mix_for_step(x, y, batch["ids"], cfg, len(self.data.index.classes), state.step)
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
        if o.clip_value:
            self.accelerator.clip_grad_value_(params, o.clip_value)
        next_step = state.step + 1
        logging = next_step % self.cfg.train.log_every == 0 or next_step == self.total_steps
        if o.clip_norm or logging:  # clip_norm=inf only measures (multiplies by exactly 1)
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                    o.clip_norm or float("inf"))
            self.grad_norm = norm

    def check_finite(self, first_bad: torch.Tensor, state: State) -> None:
        bad = int(first_bad.item())  # note: CPU-GPU sync point, only at log/save boundaries
        if bad >= 0:
            raise NonFiniteLoss(
                f"non-finite loss at optimizer step {bad}: stopping; the last checkpoint in "
                f"{self.out_dir / 'checkpoints'} is from before it (lower optim.max_lr or add "
                f"optim.clip_norm)")

    def log_step(self, state: State, loss: torch.Tensor, lr: float, window) -> None:
        now = time.perf_counter()
        steps = state.step - window.step
        images_per_sec = steps * self.cfg.data.batch_size / max(now - window.time, 1e-9)
        norm = getattr(self, "grad_norm", None)
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
    def end_of_epoch(self, state: State, total_steps: int, window) -> None:
        cfg = self.cfg
        state.train_seconds += time.perf_counter() - window.time
        epoch = math.ceil(state.step / self.data.plan.steps_per_epoch)
        sync_bn_stats(self.model, self.accelerator)
        if self.data.val is not None and (epoch % cfg.train.eval_every == 0
                                          or state.step == total_steps):
            val = self.eval_split(self.data.val)
            state.last_val = val
            self.reporter.log("epoch", state.step, {
                "epoch": epoch, "val/loss": val["loss"], "val/acc": val["acc"],
                "val/top5": val["top5"]})
            if val["acc"] > state.best_val_acc:
                state.best_val_acc = val["acc"]
                if self.accelerator.is_main_process:
                    (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
                    save_weights(self.out_dir / "checkpoints" / "best.safetensors",
                                 self.eval_state(), self.meta)
        self.save(state)
        self.set_frozen(epoch)
        window.time, window.step = time.perf_counter(), state.step

    def eval_split(self, table, model=None, transform=None) -> dict:
        options = options_from_config(self.cfg, self.data.index.channels, self.data.image_size,
                                      False)
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

    def total_over_ranks(self, count: int) -> int:
        t = torch.tensor([count], dtype=torch.long, device=self.accelerator.device)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    @torch.no_grad()
    def ranks_identical(self) -> bool:
        """Whether every rank ends with bit-identical weights and buffers (a DDP sanity check)."""
        if self.accelerator.num_processes == 1:
            return True
        state = self.accelerator.unwrap_model(self.model).state_dict()
        if self.ema is not None:
            state = {**state, **self.ema.state_dict()}
        fingerprint = torch.stack([v.double().sum() + v.double().abs().sum()
                                   for v in state.values() if v.is_floating_point()])
        everyone = self.accelerator.gather(fingerprint[None])  # (world, n)
        return bool((everyone == everyone[0]).all())

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
        final["ranks_identical"] = self.ranks_identical()
        final["skipped_samples"] = self.total_over_ranks(state.skipped_samples)
        self.reporter.finish(final)
        if acc.is_main_process:
            write_eval_files(self.out_dir, val, test, self.data.index.classes, self.cfg.log.plots)
        if self.reporter.wandb_on:  # main process only: a local forward, no collective
            from shardtrain.media import final_media

            self.reporter.log_media(state.step, final_media(self, self.total_steps, test or val))
        self.eval_loaders.clear()  # stop their persistent workers now, not at interpreter exit
        acc.wait_for_everyone()  # else a rank can die at exit and leave the other waiting
        acc.end_training()
        return final


@dataclass
class Window:
    """Start of the current timing window (for images/s and train_seconds)."""

    time: float
    step: int


RESUMABLE_CHANGES = ("data.path", "data.workers", "data.prefetch", "train.epochs",
                     "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.dist_timeout", "log.wandb", "log.name",
                     "log.group", "log.tags", "log.plots")
