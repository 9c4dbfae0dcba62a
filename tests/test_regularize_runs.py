"""EMA, mixup/cutmix, label smoothing and TTA inside real training runs (1 and 2 processes).

Each claim is checked against an independent computation: the saved EMA against an uninterrupted
run, final.json's accuracies against evaluations of the saved weights, the logged loss against the
loss recomputed by hand.
"""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import RUNS, read_json, read_jsonl, run_shardtrain, signal_at_known_step, start
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = RUNS  # real training subprocesses

EXTRAS = ["train.ema_decay=0.9", "train.ema_warmup=10", "train.tta=flip_translate",
          "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "augment.random_erasing=0.25",
          "augment.policy=randaugment", "optim.label_smoothing=0.1"]


def train_args(data, out, recipe, *overrides):
    return ["train", "--recipe", recipe, "--data", data, "--out", out, *EXTRAS, *overrides]


@pytest.fixture(scope="module")
def ema_runs(learnable_shards, tiny_recipe, tmp_path_factory):
    """(uninterrupted run, run preempted by SIGTERM and resumed, the step that handled it)."""
    base = tmp_path_factory.mktemp("ema")
    common = ("train.epochs=2", "train.log_every=1")
    whole, resumed = base / "whole", base / "resumed"
    run_shardtrain(train_args(learnable_shards, whole, tiny_recipe, *common))
    proc = start(train_args(learnable_shards, resumed, tiny_recipe, *common), nproc=1)
    handled = signal_at_known_step(resumed, proc, signal.SIGTERM, after=3)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-2000:]
    ckpt = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert ckpt["trainer"]["step"] == handled and int(ckpt["model"]["ema.n_averaged"]) == handled
    run_shardtrain(train_args(learnable_shards, resumed, tiny_recipe, *common, "--resume", "auto"))
    return whole, resumed, handled


def test_ema_resumed_after_sigterm_is_bitwise_the_uninterrupted_ema(ema_runs):
    whole, resumed, handled = ema_runs
    assert 3 < handled < 24
    a = load_file(whole / "checkpoints" / "step-000024" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-000024" / "model.safetensors")
    assert int(a["ema.n_averaged"]) == 24 and a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]  # weights, BN buffers, ema.*
    assert not different, different[:5]
    saved_a = load_file(whole / "model.safetensors")
    saved_b = load_file(resumed / "model.safetensors")
    assert saved_a.keys() == {k[4:] for k in a if k.startswith("ema.") and k != "ema.n_averaged"}
    for key, value in saved_a.items():  # the run's model is the EMA, bitwise the same
        assert torch.equal(value, a[f"ema.{key}"]) and torch.equal(value, saved_b[key]), key
    assert read_json(whole / "final.json")["test_acc"] == read_json(resumed / "final.json")[
        "test_acc"]


def evaluate_weights(state: dict, meta: dict, shards, split: str, tta: str = "none") -> dict:
    """Score weights in this process, independently of the training run's own evaluation."""
    from accelerate import Accelerator

    from shardtrain.data.index import load_index, sample_table
    from shardtrain.data.loader import SampleOptions, make_eval_loader
    from shardtrain.evaluate import evaluate
    from shardtrain.models import create_model
    from shardtrain.tools.inference import batch_options
    from shardtrain.tta import make_tta

    model = create_model(meta["model"], len(meta["classes"]), meta["channels"],
                         **meta["model_kwargs"])
    model.load_state_dict(state)
    table = sample_table(load_index(shards), split)
    options = SampleOptions(channels=meta["channels"], image_size=meta["image_size"], train=False)
    loader = make_eval_loader(table, options, world_size=1, rank=0, batch_size=32, workers=0,
                              pin_memory=False)
    return evaluate(model, loader, Accelerator(cpu=True), batch_options(meta),
                    len(meta["classes"]), transform=make_tta(tta))


def test_ema_run_reports_the_scores_of_the_weights_it_saves(ema_runs, learnable_shards):
    """test_* = the saved EMA, test_*_raw = the plain weights, test_*_tta = EMA + TTA: each
    equal to an evaluation of those weights here, and the three told apart by their loss (the
    accuracies alone can coincide on this easy data)."""
    from shardtrain.checkpoint import load_weights
    from shardtrain.ema import split_ema

    whole, _, _ = ema_runs
    final = read_json(whole / "final.json")
    ema, meta = load_weights(whole / "model.safetensors")
    raw, _ = split_ema(load_weights(whole / "checkpoints" / "step-000024")[0])
    for split in ("val", "test"):
        scores = {"": evaluate_weights(ema, meta, learnable_shards, split),
                  "_raw": evaluate_weights(raw, meta, learnable_shards, split),
                  "_tta": evaluate_weights(ema, meta, learnable_shards, split, "flip_translate")}
        losses = sorted(s["loss"] for s in scores.values())
        assert losses[1] > losses[0] * 1.001 and losses[2] > losses[1] * 1.001, losses
        for suffix, score in scores.items():
            assert final[f"{split}_acc{suffix}"] == score["acc"], (split, suffix)
            assert final[f"{split}_loss{suffix}"] == pytest.approx(score["loss"], rel=1e-5)


def test_ema_and_mixing_on_two_processes_keep_ranks_identical(learnable_shards, tiny_recipe,
                                                              tmp_path):
    out = tmp_path / "run2"
    run_shardtrain(train_args(learnable_shards, out, tiny_recipe, "train.epochs=1"), nproc=2)
    final = read_json(out / "final.json")
    assert final["world_size"] == 2 and final["ranks_identical"] is True  # model and EMA
    assert "test_acc_tta" in final and "test_acc_raw" in final


def first_step_loss_by_hand(data, recipe, overrides: list[str], smoothing: float,
                            mix: bool) -> float:
    """The loss of optimizer step 1 rebuilt here: same initial weights, first micro-batch,
    batch augmentation and mix as `shardtrain train`, then the soft-target smoothed CE."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from shardtrain.config import load_config
    from shardtrain.data.batch import prepare_batch
    from shardtrain.data.loader import make_train_loader, train_options
    from shardtrain.data.mix import mix_for_step
    from shardtrain.train import build_model, setup_data

    cfg = load_config(str(recipe), [*overrides, f"data.path={data}"])
    acc = Accelerator(cpu=True)
    d = setup_data(cfg, acc)
    set_seed(cfg.train.seed)
    model, _ = build_model(cfg, d.index, d.image_size)
    options = train_options(cfg.augment, cfg.train.seed, d.index.channels, d.image_size)
    batch = next(iter(make_train_loader(d.train, d.plan, options, start_micro=0, end_micro=1,
                                        workers=0, prefetch=2, pin_memory=False)))
    x, y = prepare_batch(batch, torch.device("cpu"), d.batch_opts, train=True)
    K = len(d.index.classes)
    targets = torch.nn.functional.one_hot(y, K).float()
    if mix:
        x, targets = mix_for_step(x, y, batch["ids"], cfg.augment, seed=cfg.train.seed, step=0,
                                  num_classes=K)
    with torch.no_grad():
        log_probs = model.train()(x).log_softmax(dim=1)
    smoothed = targets * (1 - smoothing) + smoothing / K
    return float(-(smoothed * log_probs).sum(dim=1).mean())


def test_label_smoothing_composes_with_mixup_in_training(learnable_shards, tiny_recipe,
                                                         tmp_path):
    overrides = ["augment.mixup_alpha=0.4", "augment.mix_prob=1.0", "optim.label_smoothing=0.2",
                 "train.max_steps=1", "train.log_every=1", "log.plots=false"]
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", out,
                    *overrides])
    (logged,) = [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "step"]

    def by_hand(smoothing, mix):
        return first_step_loss_by_hand(learnable_shards, tiny_recipe, overrides, smoothing, mix)

    assert logged == pytest.approx(by_hand(0.2, mix=True), rel=1e-5)
    for wrong in (by_hand(0.0, mix=True), by_hand(0.2, mix=False)):  # smoothing or mixup lost
        assert logged != pytest.approx(wrong, rel=1e-3)
