"""EMA, mixup/cutmix, random erasing, RandAugment/TrivialAugment, TTA and head_lr_mult, as pure
functions and modules (in real training runs: test_regularize_runs.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardtrain.data.transforms import apply_policy, random_erase, sample_generator
from shardtrain.ema import EMA, ema_decay_at, split_ema
from shardtrain.data.mix import mix_batch, mix_rng
from shardtrain.optim import make_optimizer, make_scheduler, param_groups
from shardtrain.tta import make_tta, tta_logits


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


def test_ema_warmup_ramps_the_decay_as_1_plus_n_over_warmup_plus_n():
    """The EMA's tensors themselves (not ema_decay_at): update n >= 1 uses
    d_n = min(decay, (1 + n) / (warmup + n)), so early updates follow the weights closely."""
    torch.manual_seed(0)
    model, decay, warmup = toy_model(), 0.99, 10
    ema = EMA(model, decay, warmup=warmup)
    expected = None
    for n in range(8):
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(2, 3))
        ema.update(model)
        w = model[0].weight.detach().clone()
        d = min(decay, (1 + n) / (warmup + n))  # 2/11, 3/12, ... (update 0 copies)
        expected = w if n == 0 else d * expected + (1 - d) * w
        torch.testing.assert_close(ema.module[0].weight, expected)
    no_warmup = EMA(model, decay)  # warmup=0: the plain decay from the first update on
    with torch.no_grad():
        model[0].weight.add_(1.0)
    no_warmup.update(model)
    torch.testing.assert_close(no_warmup.module[0].weight, model[0].weight)  # copy
    old = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    no_warmup.update(model)
    torch.testing.assert_close(no_warmup.module[0].weight, decay * old + (1 - decay) * (old + 1))


def test_ema_state_round_trip():
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
class Recorder(nn.Module):
    """An asymmetric model (a linear map of every pixel) that keeps each input it is given."""

    def __init__(self, channels=3, size=16, classes=4):
        super().__init__()
        self.fc = nn.Linear(channels * size * size, classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.fc(x.flatten(1))


def reflect(i: int, n: int) -> int:
    """Index i mirrored into 0..n-1 without repeating the edge (numpy/torch "reflect")."""
    i = -i if i < 0 else i
    return 2 * (n - 1) - i if i > n - 1 else i


def naive_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The TTA views by index arithmetic: hflip = columns reversed; a shift by d moves content
    d px down and right, out[i, j] = x[reflect(i - d), reflect(j - d)]."""
    H, W = x.shape[-2:]
    flipped = x[..., torch.arange(W - 1, -1, -1)]

    def shift(v, d):
        rows = torch.tensor([reflect(i - d, H) for i in range(H)])
        cols = torch.tensor([reflect(j - d, W) for j in range(W)])
        return v[..., rows, :][..., cols]

    views = [x, flipped]
    if mode == "flip_translate":
        views += [shift(v, d) for v in (x, flipped) for d in (2, -2)]
    return views


@pytest.mark.parametrize("mode,n_views", [("flip", 2), ("flip_translate", 6)])
def test_tta_averages_the_softmax_of_really_flipped_and_shifted_views(mode, n_views):
    torch.manual_seed(0)
    model, (x, _) = Recorder(), batch()
    expected_views = naive_views(x, mode)
    got = tta_logits(model, x, mode)
    assert len(model.seen) == n_views and len(expected_views) == n_views
    for view in expected_views:  # each view was given to the model (order does not matter)
        assert any(torch.equal(view, seen) for seen in model.seen)
    assert len({v.numpy().tobytes() for v in model.seen}) == n_views  # all distinct
    with torch.no_grad():
        probs = torch.stack([model.fc(v.flatten(1)).softmax(dim=1) for v in expected_views])
        plain = model.fc(x.flatten(1)).log_softmax(dim=1)
    torch.testing.assert_close(got, probs.mean(dim=0).log())
    assert (got - plain).abs().max() > 1e-3  # an asymmetric model: TTA changes the output
    assert make_tta("none") is None
    torch.testing.assert_close(make_tta(mode)(model, x), got)


def test_evaluate_with_tta_scores_the_averaged_views():
    from accelerate import Accelerator

    from shardtrain.data.batch import BatchOptions
    from shardtrain.evaluate import evaluate

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    loader = [{"images": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g),
               "labels": torch.randint(0, 4, (8,), generator=g), "skipped": []}
              for _ in range(3)]
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    opts = BatchOptions(mean, std, "standardize")
    acc, model = Accelerator(cpu=True), Recorder()
    plain = evaluate(model, loader, acc, opts, 4)
    tta = evaluate(model, loader, acc, opts, 4, transform=make_tta("flip_translate"))
    # by hand: normalise, average the softmax of the 6 naive views, score
    x = torch.cat([b["images"] for b in loader]).float() / 255
    x = (x - mean[:, None, None]) / std[:, None, None]
    y = torch.cat([b["labels"] for b in loader])
    with torch.no_grad():
        probs = torch.stack([model.fc(v.flatten(1)).softmax(dim=1)
                             for v in naive_views(x, "flip_translate")]).mean(dim=0)
    assert tta["samples"] == plain["samples"] == 24
    assert tta["acc"] == pytest.approx(float((probs.argmax(dim=1) == y).float().mean()))
    assert tta["loss"] == pytest.approx(float(nn.functional.nll_loss(probs.log(), y)), rel=1e-5)
    assert tta["loss"] != pytest.approx(plain["loss"], rel=1e-3)


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
