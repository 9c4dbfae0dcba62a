"""Optimizer groups and the learning-rate schedule against their closed forms."""

import pytest
import torch
from torch import nn

from shardtrain.models import create_model
from shardtrain.optim import (l1_penalty, lr_factor, make_optimizer, make_scheduler,
                              param_groups)

DIV, FINAL = 25.0, 1e4
END = 1 / (DIV * FINAL)


def factors(total, schedule, warmup_frac=0.25):
    return [lr_factor(s, total, schedule, warmup_frac, DIV, FINAL) for s in range(total)]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
@pytest.mark.parametrize("total", [1, 2, 7, 1000])
@pytest.mark.parametrize("warmup_frac", [0.0, 0.25, 0.5])
def test_schedule_closed_form(schedule, total, warmup_frac):
    f = factors(total, schedule, warmup_frac)
    warm = round(warmup_frac * (total - 1))
    assert f[-1] == END  # the last step uses the minimum, exactly
    if warm > 0:
        assert f[0] == pytest.approx(1 / DIV)
    if warm < total - 1:
        assert f[warm] == pytest.approx(1.0)
        assert max(f) == pytest.approx(1.0)
    rise, fall = f[: warm + 1], f[warm:]
    if warm == total - 1:
        rise, fall = f[:-1], f[-1:]
    assert all(a <= b for a, b in zip(rise, rise[1:]))
    assert all(a >= b for a, b in zip(fall, fall[1:]))
    assert lr_factor(total + 5, total, schedule, warmup_frac, DIV, FINAL) == END


def torch_onecycle(total: int, pct_start: float) -> list[float]:
    """torch.optim.lr_scheduler.OneCycleLR factors (max_lr 1), read before each optimizer step."""
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=total, pct_start=pct_start, div_factor=DIV,
        final_div_factor=FINAL, anneal_strategy="cos", cycle_momentum=False)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total,warmup_frac", [(1001, 0.25), (48, 0.25), (7, 0.5), (101, 0.3),
                                                (10, 0.1)])
def test_onecycle_is_torch_onecyclelr_over_the_whole_curve(total, warmup_frac):
    """Same curve as torch's OneCycleLR (cos anneal, two phases), warm-up and decay, every step.

    The peak is placed differently: ours at step round(warmup_frac * (total - 1)), torch's at
    step pct_start * total - 1, so pct_start = (warm + 1) / total gives the same schedule.
    (torch cannot express warm = 0, i.e. warmup_frac=0 starting at the peak: it divides by 0.)
    """
    ours = factors(total, "onecycle", warmup_frac)
    warm = round(warmup_frac * (total - 1))
    assert ours == pytest.approx(torch_onecycle(total, (warm + 1) / total), rel=1e-12, abs=0)
    # the decay half by itself: half-way from the peak to the last step, the cosine is at half
    last = total - 1
    if (last - warm) % 2 == 0:
        assert ours[(warm + last) // 2] == pytest.approx((1 + END) / 2, rel=1e-12)
    assert ours[warm] == 1.0 and ours[-1] == END


def test_warmup_shapes_at_their_midpoints():
    f = factors(1001, "onecycle", 0.25)  # warm = 250
    assert f[125] == pytest.approx(1 / DIV + (1 - 1 / DIV) / 2, rel=1e-12)  # cosine rise
    cosine = factors(1001, "cosine", 0.25)
    assert cosine[125] == pytest.approx((1 / DIV + 1) / 2, rel=1e-12)  # linear warm-up
    assert cosine[250:] == f[250:]  # same cosine decay


def test_constant_schedule():
    assert factors(5, "constant", 0.0) == [1.0] * 5
    f = factors(9, "constant", 0.5)  # warm = 4
    assert f[0] == pytest.approx(1 / DIV) and f[4:] == [1.0] * 5
    assert factors(1, "constant") == [1.0]
    with pytest.raises(ValueError):
        lr_factor(0, 10, "linear", 0.1, DIV, FINAL)
    with pytest.raises(ValueError):
        lr_factor(0, 0, "onecycle", 0.1, DIV, FINAL)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("total", [1, 2, 7, 50])
def test_scheduler_drives_real_optimizer(name, total):
    model = nn.Linear(3, 2)
    opt = make_optimizer(name, param_groups(model, 1e-4), lr=123.0)
    sched = make_scheduler(opt, 0.1, total, "onecycle", 0.3, DIV, FINAL)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])  # lr used by this optimizer step
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    expected = [0.1 * f for f in factors(total, "onecycle", 0.3)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.1 * END, rel=1e-12)


def test_weight_decay_groups_resnet9():
    model = create_model("resnet9", num_classes=10, in_chans=3, widths=[4, 8, 8, 16])
    groups = param_groups(model, weight_decay=5e-4)
    decay = {id(p) for g in groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay == {id(p) for p in model.parameters() if p.ndim >= 2}
    assert no_decay == {id(p) for p in model.parameters() if p.ndim < 2}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["lr_mult"] == 1.0 for g in groups)


def test_head_lr_mult():
    model = create_model("transfer", num_classes=3, backbone="resnet18", pretrained="",
                         head_hidden=8)
    groups = param_groups(model, 1e-4, head_lr_mult=10.0)
    head = {id(p) for g in groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert head == {id(p) for p in model.head.parameters()}
    opt = make_optimizer("sgd", groups, lr=1.0)
    make_scheduler(opt, 0.01, 10, "constant", 0.0, DIV, FINAL)
    lrs = {g["lr_mult"]: g["lr"] for g in opt.param_groups}
    assert lrs == {1.0: pytest.approx(0.01), 10.0: pytest.approx(0.1)}
    assert type(make_optimizer("adam", groups, 1e-3)) is torch.optim.Adam
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lion", groups, 1e-3)


def test_l1_penalty():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    expected = model[0].weight.abs().sum()
    assert torch.allclose(l1_penalty(model), expected)
    l1_penalty(model).backward()
    assert model[0].bias.grad is None and model[0].weight.grad is not None


def test_extended_schedule_is_continuous_and_survives_the_scheduler_state():
    """Planned 10 steps, 7 done, then extended to 14: step index 7 keeps its planned lr, the
    rest of the plan is stretched over indices 7..13, and the extension is saved with the
    scheduler state (a second resume with the same total changes nothing)."""
    model = nn.Linear(2, 2)
    opt = make_optimizer("sgd", param_groups(model, 0.0), 0.1)
    sched = make_scheduler(opt, 0.1, 10, "onecycle", 0.25, DIV, FINAL)
    planned = [0.1 * f for f in factors(10, "onecycle")]
    for _ in range(7):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    resumed = make_scheduler(make_optimizer("sgd", param_groups(model, 0.0), 0.1), 0.1, 14,
                             "onecycle", 0.25, DIV, FINAL)
    resumed.load_state_dict(saved)
    resumed.lr_lambdas[0].extend(7, 14)
    lrs = []
    for _ in range(7):
        lrs.append(resumed.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.step()
    assert lrs[0] == pytest.approx(planned[7], rel=1e-12)
    assert all(b < a for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1 * END)
    again = make_scheduler(opt, 0.1, 14, "onecycle", 0.25, DIV, FINAL)
    again.load_state_dict(resumed.state_dict())
    again.lr_lambdas[0].extend(14, 14)
    assert again.lr_lambdas[0].position(10) == resumed.lr_lambdas[0].position(10)


@pytest.mark.parametrize("clip_value", [0.0, 0.01])
def test_clip_gradients_returns_the_norm_before_clipping(clip_value):
    from types import SimpleNamespace

    from shardtrain.step import clip_gradients

    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(5, 3)), nn.Parameter(torch.zeros(4))]
    for p in params:
        p.grad = torch.randn_like(p)
    before = torch.cat([p.grad.flatten() for p in params]).norm()
    accelerator = SimpleNamespace(unscale_gradients=lambda: None)
    norm = clip_gradients(accelerator, params, clip_value, clip_norm=0.5, measure=True)
    assert norm == pytest.approx(before.item(), rel=1e-6)
    clipped = torch.cat([p.grad.flatten() for p in params])
    if clip_value:  # by value first: small enough that clipping by norm leaves it
        assert clipped.abs().max() == clip_value and clipped.norm() < 0.5
    else:
        assert clipped.norm() == pytest.approx(0.5, rel=1e-4)
    assert clip_gradients(accelerator, params, clip_value, clip_norm=0.5) is None
