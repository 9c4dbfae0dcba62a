"""Loop: the optimizer-step loop of train(): steps, epoch-end eval, checkpoints, preemption, and
the final evaluation and files.

Step body (accelerate's gradient_accumulation example):
    with accelerator.accumulate(model): forward, backward, clip on sync, optimizer.step()
then, once per optimizer step: scheduler.step(), EMA update, and at boundaries (log steps,
epoch ends, checkpoints, preemption) one finiteness check, agreed by all ranks, before anything
is logged or saved.
The shard loader is NOT passed to accelerator.prepare (it would re-split or dispatch batches the
plan has already split by rank); batches move to the device in data/batch.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import gather_object

from shardtrain.checkpoint import save_checkpoint, save_weights
from shardtrain.config import RESUMABLE_CHANGES, config_hash
from shardtrain.data.batch import prepare_batch
from shardtrain.data.loader import (EVAL, eval_options, make_eval_loader, make_train_loader,
                                    train_options)
from shardtrain.data.mix import mix_for_step
from shardtrain.errors import ExitCode, NonFiniteLoss
from shardtrain.evaluate import (evaluate, ranks_identical, sum_over_ranks, sum_per_node,
                                 sync_bn_stats)
from shardtrain.optim import l1_penalty
from shardtrain.preemption import Preemption
from shardtrain.step import Clock, State, StepLoss, clip_gradients, plain_module
from shardtrain.tracking.report import final_metrics, write_eval_files
from shardtrain.tta import make_tta


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
        self.plain = plain_module(accelerator, model)
        self.total_steps = total_steps
        self.reporter, self.meta, self.out_dir = reporter, meta, out_dir
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.pin = torch.cuda.is_available()
        self.fp16 = accelerator.mixed_precision == "fp16"
        self.preemption = Preemption()
        self.eval_loaders: dict[int, torch.utils.data.DataLoader] = {}  # made once per split
        self.grad_norm: torch.Tensor | None = None  # measured on the steps that log it
        self.gradient_histograms: dict | None = None  # log.histograms: the epoch's last step
        self.losses = StepLoss(accelerator.device)

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
        clock = Clock(state.step)
        for batch in loader:
            self.micro_step(batch, state)
            if not acc.sync_gradients:
                continue
            lr = self.scheduler.get_last_lr()[0]  # the lr this step used
            self.after_optimizer_step(state)
            last = state.step == self.total_steps
            logging = state.step % cfg.train.log_every == 0 or last
            preempted = self.preemption.agreed(acc, state.step)
            epoch_end = state.step % plan.steps_per_epoch == 0 or last
            periodic = bool(cfg.train.checkpoint_every
                            and state.step % cfg.train.checkpoint_every == 0)
            if logging or preempted or epoch_end or periodic:
                self.check_finite()  # nothing is logged or saved past a non-finite loss
            if logging:
                self.log_step(state, lr, clock)
            if not (epoch_end or periodic or preempted):
                continue
            clock.stop(state)  # evaluation and checkpoint writing are not training time
            if epoch_end:  # also when preempted here: validate, then checkpoint
                self.end_of_epoch(state)
            else:
                self.save(state)
            if preempted:
                self.reporter.print(f"preempted: checkpoint at step {state.step}, exiting "
                                    f"{int(ExitCode.PREEMPTED)} to be requeued")
                self.reporter.close()
                return True
            clock.restart()
        return False

    def after_optimizer_step(self, state: State) -> None:
        """Schedule, EMA and counters, once per optimizer step (no CPU-GPU sync)."""
        acc = self.accelerator
        self.scheduler.step()
        state.step += 1
        if self.ema is not None:  # same weights on every rank: update from the plain model
            self.ema.update(self.plain)
        state.images_seen += self.cfg.data.batch_size
        # fp16: the grad scaler skips steps with inf/nan gradients by design: count them instead
        self.losses.end_step(state.step, track_finite=not self.fp16)
        if self.fp16:
            state.fp16_skipped_steps += int(acc.optimizer_step_was_skipped)
        self.reporter.advance()

    def micro_step(self, batch: dict, state: State) -> torch.Tensor | None:
        """Forward and backward of one micro-batch (and the optimizer step on the last one of
        an accumulation); its loss, or None when it had too few readable samples to train on."""
        cfg, acc = self.cfg, self.accelerator
        if batch["skipped"]:
            state.skipped_samples += len(batch["skipped"])
            state.skipped_examples = (state.skipped_examples + batch["skipped"])[:20]
            self.reporter.print(f"skipped corrupt sample(s): {'; '.join(batch['skipped'][:3])}")
        x, y = prepare_batch(batch, acc.device, self.data.batch_opts, train=True)
        # BatchNorm needs 2+ samples (unless the recipe asks for 1), an empty batch has no loss
        usable = len(y) >= min(2, self.data.plan.batch_per_device)
        if not usable:
            state.skipped_micro_batches += 1
            self.reporter.print(f"skipped micro-batch of step {state.step + 1}: {len(y)} readable "
                                f"sample(s), BatchNorm needs 2")
        elif cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:  # y: soft targets (B, K)
            x, y = mix_for_step(x, y, batch["ids"], cfg.augment, seed=cfg.train.seed,
                                step=state.step, num_classes=len(self.data.index.classes))
        with acc.accumulate(self.model):
            if usable:
                loss = self.criterion(self.model(x), y)
                if cfg.optim.l1:
                    loss = loss + cfg.optim.l1 * l1_penalty(self.plain)
            else:
                loss = self.no_gradient_loss(x)
            acc.backward(loss)
            if acc.sync_gradients:
                self.clip(state)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not usable:
            return None
        self.losses.add(loss)
        return loss

    def no_gradient_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Zero times the output of one blank image in eval mode: this rank still takes part in
        the step's gradient all-reduce (DDP would hang if it skipped it), adding nothing."""
        blank = x.new_zeros((1, *x.shape[1:]))  # (1, C, H, W)
        self.model.eval()
        try:
            return self.model(blank).float().sum() * 0.0
        finally:
            self.model.train()

    def clip(self, state: State) -> None:
        o, next_step = self.cfg.optim, state.step + 1
        logging = next_step % self.cfg.train.log_every == 0 or next_step == self.total_steps
        histograms = self.cfg.log.histograms and (next_step % self.data.plan.steps_per_epoch == 0
                                                  or next_step == self.total_steps)  # epoch end
        norm = clip_gradients(self.accelerator, self.model.parameters(), o.clip_value,
                              o.clip_norm, measure=logging,
                              before_clipping=self.keep_gradient_histograms if histograms else None)
        if logging:
            self.grad_norm = norm

    def keep_gradient_histograms(self) -> None:
        """log.histograms: this step's unscaled gradients before clipping (rank 0 keeps them)."""
        self.gradient_histograms = self.reporter.gradient_histograms(self.plain)

    def check_finite(self) -> None:
        """Raise NonFiniteLoss on every rank when any rank has seen a non-finite loss."""
        # note: a collective and a CPU-GPU sync point, only at boundaries
        everyone = self.accelerator.gather(self.losses.first_bad_step[None])  # (world,)
        bad = everyone[everyone >= 0]
        if len(bad):
            raise NonFiniteLoss(
                f"non-finite loss at optimizer step {int(bad.min())}: stopping; the last "
                f"checkpoint in {self.out_dir / 'checkpoints'} is from before it (lower "
                f"optim.max_lr or add optim.clip_norm)")

    def check_finite_weights(self, model_state: dict, step: int) -> None:
        """Before a checkpoint: an update can diverge while its loss is still finite (seen: a
        NaN gradient norm at the last finite loss); such weights must not become `latest`.
        Every rank holds the same weights, so every rank raises."""
        floats = [v for v in model_state.values() if v.is_floating_point()]
        if not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
            raise NonFiniteLoss(
                f"non-finite weights after optimizer step {step}: stopping; the last checkpoint "
                f"in {self.out_dir / 'checkpoints'} is from before it (lower optim.max_lr or add "
                f"optim.clip_norm)")

    def log_step(self, state: State, lr: float, clock: Clock) -> None:
        """train/loss: the mean over ranks and micro-batches of this optimizer step."""
        steps, seconds = clock.lap(state)
        loss_sum, count = self.losses.last
        # note: a collective and a CPU-GPU sync point, only at log steps
        total = self.accelerator.reduce(
            torch.stack([loss_sum.float(), torch.tensor(float(count), device=loss_sum.device)]),
            reduction="sum").tolist()
        norm = self.grad_norm
        self.reporter.log("step", state.step, {
            "epoch": state.step / self.data.plan.steps_per_epoch,
            "train/loss": total[0] / total[1] if total[1] else float("nan"),
            "train/lr": lr,
            "train/images_per_sec": steps * self.cfg.data.batch_size / max(seconds, 1e-9),
            "train/grad_norm": float(norm) if norm is not None else float("nan"),
        })

    # ---- epoch ends, checkpoints ------------------------------------------------------------
    def end_of_epoch(self, state: State) -> None:
        """Validate (and keep the best weights) when due, checkpoint, unfreeze when due."""
        cfg = self.cfg
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
        # log.histograms (rank 0)
        self.reporter.log_histograms(state.step, self.plain, self.gradient_histograms)
        self.save(state)
        self.set_frozen(epoch)

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
            return self.plain
        sync_bn_stats(self.ema.module, self.accelerator)  # EMA of BN buffers differs per rank
        return self.ema.module

    def eval_state(self) -> dict:
        """No collective (rank 0 only calls it): EMA BN buffers were synced by the last eval."""
        return (self.ema.module if self.ema is not None else self.plain).state_dict()

    def extra_evals(self) -> dict:
        """final.json extras: the plain model when EMA is on (*_acc_raw, *_loss_raw), TTA
        (*_acc_tta, *_loss_tta)."""
        extra = {}
        if self.ema is not None:  # also without val/test: the saved EMA gets averaged BN stats
            sync_bn_stats(self.ema.module, self.accelerator)
        for name, table in (("val", self.data.val), ("test", self.data.test)):
            if table is None:
                continue
            if self.ema is not None:
                r = self.eval_split(table, model=self.plain)
                extra[f"{name}_acc_raw"], extra[f"{name}_loss_raw"] = r["acc"], r["loss"]
            if self.cfg.train.tta != "none":
                tta = make_tta(self.cfg.train.tta)
                r = self.eval_split(table, transform=tta)
                extra[f"{name}_acc_tta"], extra[f"{name}_loss_tta"] = r["acc"], r["loss"]
        return extra

    def set_frozen(self, epoch: int) -> None:
        if self.cfg.model.freeze_epochs and hasattr(self.plain, "backbone"):
            from shardtrain.models.transfer import set_backbone_trainable

            set_backbone_trainable(self.plain, epoch >= self.cfg.model.freeze_epochs)

    def gather_ranks(self, state: State) -> tuple[list, dict]:
        """(every rank's RNG states, the skipped_* counts summed over ranks). A collective."""
        mine = {"rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state()
                        if torch.cuda.is_available() else None},
                "skipped": (state.skipped_samples, state.skipped_micro_batches,
                            state.skipped_examples)}
        everyone = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        samples, micro, examples = zip(*(r["skipped"] for r in everyone))
        totals = {"skipped_samples": sum(samples), "skipped_micro_batches": sum(micro),
                  "skipped_examples": [e for rank in examples for e in rank][:20]}
        return [r["rng"] for r in everyone], totals

    def save(self, state: State) -> None:
        """Complete checkpoint: rank 0 writes, every rank contributes its RNG state."""
        acc = self.accelerator
        sync_bn_stats(self.model, acc)
        rng_states, skipped = self.gather_ranks(state)
        model_state = self.plain.state_dict()
        if self.ema is not None:  # checkpoint: model + EMA tensors under the `ema.` prefix
            sync_bn_stats(self.ema.module, acc)
            model_state.update(self.ema.state_dict())
        self.check_finite_weights(model_state, state.step)
        if acc.is_main_process:
            optim = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
            trainer = {"step": state.step, "world_size": acc.num_processes,
                       "index_hash": self.data.index_hash,
                       "config_hash": config_hash(self.cfg, RESUMABLE_CHANGES),
                       "config": asdict(self.cfg),
                       "state": {**asdict(state), **skipped}}
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
        weights = self.plain.state_dict()
        if self.ema is not None:
            weights.update(self.ema.state_dict())
        final["ranks_identical"] = ranks_identical(weights, acc)
        final.update(self.gather_ranks(state)[1])
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

