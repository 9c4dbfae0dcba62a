"""EMA, mixup/cutmix, random erasing, RandAugment/TrivialAugment, TTA and head_lr_mult."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardtrain.data.transforms import apply_policy, random_erase, sample_generator
from shardtrain.ema import EMA, ema_decay_at, split_ema
from shardtrain.data.mix import mix_batch, mix_rng
from shardtrain.optim import make_optimizer, make_scheduler, param_groups
from shardtrain.tta import make_tta, tta_logits, tta_views


# ---- EMA ----------------------------------------------------------------------------------
def toy_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_ema_equals_closed_form_average_of_weights_and_buffers():
    torch.manual_seed(0)
    model, decay = toy_model(), 0.9
    ema = EMA(model, decay)
    history = []
    for _ in range(6):  # "optimizer steps": new weights and BN statistics
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
            model[1].num_batches_tracked += 1
        history.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    K = len(history) - 1
    for key, value in ema.module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value == history[-1][key]  # counts are copied, not averaged
            continue
        # W_0 copied, then W_k = d W_{k-1} + (1-d) w_k:  sum of d^K w_0 + (1-d) d^(K-k) w_k
        expected = decay**K * history[0][key] + sum(
            (1 - decay) * decay ** (K - k) * history[k][key] for k in range(1, K + 1))
        torch.testing.assert_close(value, expected)


def test_ema_warmup_and_state_round_trip():
    assert ema_decay_at(1, 0.999, 10) == pytest.approx(2 / 11)  # (1+n)/(10+n)
    assert ema_decay_at(10_000, 0.999, 10) == 0.999
    assert ema_decay_at(1, 0.999, 0) == 0.999
    model = toy_model()
    ema = EMA(model, 0.99, warmup=10)
    for _ in range(3):
        ema.update(model)
    state = {"0.weight": torch.zeros(2, 3), **ema.state_dict()}
    model_state, ema_state = split_ema(state)
    assert list(model_state) == ["0.weight"] and ema_state["n_averaged"] == 3
    other = EMA(toy_model(), 0.99, warmup=10)
    other.load_state_dict(state)
    assert other.updates == 3
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)


# ---- mixup / cutmix -----------------------------------------------------------------------
def batch(B=8, K=5):
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, 3, 16, 16, generator=g), torch.randint(0, K, (B,), generator=g)


def test_mixup_targets_sum_to_one_and_match_the_pixel_coefficient():
    x, y = batch()
    mixed, t = mix_batch(x, y, 5, mix_rng(0, 3, 17), mixup_alpha=0.4, cutmix_alpha=0.0)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(8))
    # recover lam from pixels of sample 0 (partner = sample 7) and compare with its targets
    lam = ((mixed[0] - x[7]) / (x[0] - x[7])).median()
    assert 0 < lam < 1
    expected = lam * nn.functional.one_hot(y[0], 5) + (1 - lam) * nn.functional.one_hot(y[7], 5)
    torch.testing.assert_close(t[0], expected.float(), atol=1e-4, rtol=0)


def test_cutmix_targets_match_the_pasted_area_ratio():
    x, y = batch()
    for step in range(5):
        mixed, t = mix_batch(x, y, 5, mix_rng(0, step, 0), mixup_alpha=0.0, cutmix_alpha=1.0)
        pasted = (mixed != x).any(dim=1)[0].float().mean()  # share of sample 0 from sample 7
        if y[0] != y[7]:
            assert t[0, y[7]] == pytest.approx(float(pasted), abs=1e-6)
        torch.testing.assert_close(t.sum(dim=1), torch.ones(8))


def test_mix_is_deterministic_and_leaves_the_global_rng_alone():
    x, y = batch()
    state = torch.get_rng_state()
    a = mix_batch(x, y, 5, mix_rng(1, 2, 3), mixup_alpha=0.2, cutmix_alpha=1.0)
    b = mix_batch(x, y, 5, mix_rng(1, 2, 3), mixup_alpha=0.2, cutmix_alpha=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(torch.get_rng_state(), state)
    _, t = mix_batch(x, y, 5, mix_rng(1, 2, 3), mixup_alpha=0.2, cutmix_alpha=0.0, mix_prob=0.0)
    assert torch.equal(t, nn.functional.one_hot(y, 5).float())


# ---- per-sample policies and random erasing -----------------------------------------------
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_policies_are_deterministic_per_sample_and_keep_shape_dtype(policy, channels):
    img = torch.randint(0, 256, (channels, 20, 20), dtype=torch.uint8)
    state = torch.get_rng_state()
    outs = [apply_policy(img, policy, sample_generator(0, 1, i)) for i in range(8)]
    again = [apply_policy(img, policy, sample_generator(0, 1, i)) for i in range(8)]
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert all(o.shape == img.shape and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, outs[0]) for o in outs)  # it does depend on the sample


def test_random_erasing_is_deterministic_and_erases_with_its_probability():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    outs = [random_erase(img, sample_generator(0, 0, i), 0.5) for i in range(200)]
    again = [random_erase(img, sample_generator(0, 0, i), 0.5) for i in range(200)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    erased = sum(bool(o.any()) for o in outs)
    assert 70 < erased < 130 and all(o.shape == img.shape and o.dtype == img.dtype for o in outs)
    assert not random_erase(img, sample_generator(0, 0, 1), 0.0).any()


# ---- test-time augmentation ---------------------------------------------------------------
class FlipInvariant(nn.Module):
    """Logits from row sums: a horizontal flip does not change them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        return self.fc(x.sum(dim=3).flatten(1))


def test_tta_of_a_flip_invariant_model_equals_plain_eval():
    torch.manual_seed(0)
    model, (x, _) = FlipInvariant(), batch()
    plain = model(x).softmax(dim=1)
    torch.testing.assert_close(tta_logits(model, x, "flip").softmax(dim=1), plain)
    assert len(tta_views(x, "flip_translate")) == 6 and make_tta("none") is None
    transform = make_tta("flip")
    torch.testing.assert_close(transform(model, x).exp(), plain)


def test_tta_in_evaluate_equals_plain_accuracy_for_a_flip_invariant_model():
    from accelerate import Accelerator

    from shardtrain.data.batch import BatchOptions
    from shardtrain.evaluate import evaluate

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    loader = [{"images": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 4, (8,), generator=g), "skipped": []}
              for _ in range(3)]
    opts = BatchOptions(torch.full((3,), 0.5), torch.full((3,), 0.25), "standardize")
    acc, model = Accelerator(cpu=True), FlipInvariant()
    plain = evaluate(model, loader, acc, opts, 4)
    tta = evaluate(model, loader, acc, opts, 4, transform=make_tta("flip"))
    assert tta["acc"] == plain["acc"] and tta["loss"] == pytest.approx(plain["loss"], rel=1e-5)


# ---- head learning-rate multiplier --------------------------------------------------------
def test_head_lr_mult_gives_the_head_groups_a_multiplied_lr():
    from shardtrain.config import load_config
    from shardtrain.models import create_model

    cfg = load_config(None, ["optim.head_lr_mult=10", "model.name=transfer",
                             "model.pretrained=", "model.backbone=resnet18"])
    model = create_model("transfer", 3, 3, backbone="resnet18", pretrained="", head_hidden=8)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.head_lr_mult)
    optimizer = make_optimizer("sgd", groups, 0.1)
    make_scheduler(optimizer, 0.1, 10, "constant", 0.0, 25.0, 1e4)
    head = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr"] == pytest.approx(1.0 if in_head == {True} else 0.1)


# ---- in a real training run ---------------------------------------------------------------
EXTRAS = ["train.ema_decay=0.9", "train.ema_warmup=10", "train.tta=flip_translate",
          "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "augment.random_erasing=0.25",
          "augment.policy=randaugment", "optim.label_smoothing=0.1"]


def run_train(data, out, recipe, *overrides, nproc=1):
    from helpers import run_shardtrain

    return run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out,
                           *EXTRAS, *overrides], nproc=nproc)


def test_ema_run_saves_ema_weights_reports_raw_and_tta_and_resumes(learnable_shards,
                                                                   tiny_recipe, tmp_path):
    from safetensors.torch import load_file

    from helpers import read_json

    out = tmp_path / "run"
    run_train(learnable_shards, out, tiny_recipe, "train.epochs=1")
    final = read_json(out / "final.json")
    for key in ("test_acc", "test_acc_raw", "test_acc_tta", "val_acc_raw", "val_acc_tta"):
        assert 0 <= final[key] <= 1, key
    ckpt = load_file(out / "checkpoints" / "step-000012" / "model.safetensors")
    assert int(ckpt["ema.n_averaged"]) == 12
    saved = load_file(out / "model.safetensors")  # the run's model is the EMA
    assert saved.keys() == {k[4:] for k in ckpt if k.startswith("ema.") and k != "ema.n_averaged"}
    for key, value in saved.items():
        assert torch.equal(value, ckpt[f"ema.{key}"]), key
    run_train(learnable_shards, out, tiny_recipe, "train.epochs=2", "--resume", "auto")
    ckpt = load_file(out / "checkpoints" / "step-000024" / "model.safetensors")
    assert int(ckpt["ema.n_averaged"]) == 24  # the average continued, not restarted


def test_ema_and_mixing_on_two_processes_keep_ranks_identical(learnable_shards, tiny_recipe,
                                                              tmp_path):
    from helpers import read_json

    out = tmp_path / "run2"
    run_train(learnable_shards, out, tiny_recipe, "train.epochs=1", nproc=2)
    final = read_json(out / "final.json")
    assert final["world_size"] == 2 and final["ranks_identical"] is True  # model and EMA
    assert "test_acc_tta" in final and "test_acc_raw" in final
