"""optim.schedule=plateau: the rule on its own, in a real run, and across a resume."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import RUNS, read_json, read_jsonl, run_shardtrain
from shardtrain.lr_plateau import PlateauLR

pytestmark = RUNS  # real training subprocesses

# threshold 0.99: a cut unless the val loss drops 100x below the best, so short runs cut
PLATEAU = ["optim.schedule=plateau", "optim.plateau_threshold=0.99", "train.log_every=1"]


def expected_lrs(losses, max_lr, factor=0.5, threshold=1e-3, min_lr=1e-5, patience=0):
    """The rule written out (torch's ReduceLROnPlateau, mode min, relative threshold)."""
    lr, best, bad, out = max_lr, float("inf"), 0, []
    for loss in losses:
        if loss < best * (1 - threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            lr, bad = max(lr * factor, min_lr), 0
        out.append(lr)
    return out


def optimizer_with_head_group():
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.Adam([{"params": [body], "lr_mult": 1.0},
                             {"params": [head], "lr_mult": 10.0}])


def test_plateau_rule_min_lr_and_state_round_trip():
    losses = [1.0, 0.9, 0.8995, 0.85, 0.86, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]
    opt = optimizer_with_head_group()
    sched = PlateauLR(opt, max_lr=1e-4, min_lr=1e-5)
    got, saved = [], None
    for i, loss in enumerate(losses):
        sched.step()  # per optimizer step: never changes the lr
        sched.observe(loss)
        got.append(sched.get_last_lr())
        if i == 3:  # a checkpoint after 4 evaluations: lr cut once, best 0.85
            saved = io.BytesIO()  # checkpoints load with weights_only=True
            torch.save({"scheduler": sched.state_dict(), "optim": opt.state_dict()}, saved)
    want = expected_lrs(losses, 1e-4, min_lr=1e-5)
    assert [g[0] for g in got] == pytest.approx(want)
    # the head group: 10x the lr, and 10x min_lr
    assert [g[1] for g in got] == pytest.approx(expected_lrs(losses, 1e-3, min_lr=1e-4))
    assert want[-1] == 1e-5 and want[2] == 5e-5  # 0.8995 is not 0.1% below 0.9: a cut

    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    fresh_opt = optimizer_with_head_group()  # the order of train.restore(): build, then load
    fresh = PlateauLR(fresh_opt, max_lr=1e-4, min_lr=1e-5)
    fresh_opt.load_state_dict(state["optim"])  # the lr lives in the optimizer's state
    fresh.load_state_dict(state["scheduler"])
    resumed = []
    for loss in losses[4:]:  # 0.86 is no better than the restored best 0.85: a cut at once
        fresh.observe(loss)
        resumed.append(fresh.get_last_lr())
    assert resumed == got[4:]


def epoch_losses_and_step_lrs(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["val/loss"] for r in records if r["kind"] == "epoch"]
    lrs = {r["step"]: r["train/lr"] for r in records if r["kind"] == "step"}
    return losses, lrs


def test_plateau_run_cuts_at_evaluations_and_resumes_exactly(learnable_shards, tiny_recipe,
                                                            tmp_path):
    straight = tmp_path / "straight"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out",
                    straight, "train.epochs=4", *PLATEAU])
    losses, lrs = epoch_losses_and_step_lrs(straight)
    per_epoch = 12  # 192 train samples / batch 16
    want = [0.01] + expected_lrs(losses, 0.01, threshold=0.99)[:-1]  # lr used in each epoch
    for epoch, lr in enumerate(want):
        steps = range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1)
        assert [lrs[s] for s in steps] == pytest.approx([lr] * per_epoch), epoch
    assert len(set(want)) > 1  # the run did cut

    resumed = tmp_path / "resumed"
    args = ["train", "--recipe", tiny_recipe, "--data", learnable_shards, "--out", resumed,
            *PLATEAU]
    run_shardtrain([*args, "train.epochs=2"])
    run_shardtrain([*args, "train.epochs=4", "--resume", "auto"])
    assert epoch_losses_and_step_lrs(resumed) == (losses, lrs)
    a, b = (read_json(d / "final.json") for d in (straight, resumed))
    assert (a["val_loss"], a["test_acc"]) == (b["val_loss"], b["test_acc"])


def test_plateau_without_a_val_split_is_refused(uneven_shards, tiny_recipe, tmp_path):
    result = run_shardtrain(["train", "--recipe", tiny_recipe, "--data", uneven_shards, "--out",
                             tmp_path / "r", "optim.schedule=plateau"], check=False)
    assert result.returncode == 2
    assert "optim.schedule=plateau" in result.stderr and "Traceback" not in result.stderr
