"""Augmentation: determinism, the vectorised crop/flip against a naive reference, normalize."""

import pytest
import torch
import torch.nn.functional as F

from torchvision.transforms.v2 import functional as TF

from shardtrain.data.transforms import (augment_sample, crop_flip_batch,
                                        jitter_factors, normalize, resize_sample,
                                        sample_crop_flip, sample_generator)


def rand_u8(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def naive_crop_flip(x, offsets, hflips, vflips, pad):
    out = []
    for img, (dy, dx), hf, vf in zip(x, offsets.tolist(), hflips.tolist(), vflips.tolist()):
        padded = F.pad(img[None].double(), (pad, pad, pad, pad), mode="reflect")[0]
        crop = padded[:, dy:dy + x.shape[2], dx:dx + x.shape[3]]
        crop = crop.flip(-1) if hf else crop
        crop = crop.flip(-2) if vf else crop
        out.append(crop.to(x.dtype))
    return torch.stack(out)


def test_sample_generator_deterministic_and_mixed():
    a = torch.rand(3, generator=sample_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=sample_generator(1, 2, 3)))
    others = [sample_generator(*k).initial_seed() for k in [(1, 2, 4), (1, 3, 3), (2, 2, 3)]]
    assert len({sample_generator(1, 2, 3).initial_seed(), *others}) == 4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("pad,hw", [(4, (32, 32)), (2, (7, 5)), (1, (28, 28))])
def test_crop_flip_batch_matches_naive(dtype, pad, hw):
    B, C = 6, 3
    x = rand_u8(B, C, *hw).to(dtype)
    gens = [sample_generator(0, 0, i) for i in range(B)]
    params = [sample_crop_flip(g, pad, hflip=True, vflip=True) for g in gens]
    offsets = torch.tensor([p[:2] for p in params])
    hflips = torch.tensor([p[2] for p in params])
    vflips = torch.tensor([p[3] for p in params])
    out = crop_flip_batch(x, offsets, hflips, vflips, pad)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, naive_crop_flip(x, offsets, hflips, vflips, pad))


def test_crop_flip_all_offsets_and_edge_cases():
    x = rand_u8(1, 1, 6, 6)
    pad = 3
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            off = torch.tensor([[dy, dx]])
            f = torch.tensor([dy % 2 == 0])
            assert torch.equal(crop_flip_batch(x, off, f, ~f, pad),
                               naive_crop_flip(x, off, f, ~f, pad))
    no = torch.zeros(4, dtype=torch.bool)
    x4 = rand_u8(4, 2, 5, 5)
    assert torch.equal(crop_flip_batch(x4, torch.zeros(4, 2, dtype=torch.long), no, no, 0), x4)
    with pytest.raises(ValueError):
        crop_flip_batch(x4, torch.zeros(4, 2, dtype=torch.long), no, no, 5)


def test_sample_crop_flip_ranges():
    draws = [sample_crop_flip(sample_generator(0, 1, i), 2, True, False) for i in range(200)]
    assert {d[0] for d in draws} == set(range(5)) == {d[1] for d in draws}
    assert {d[2] for d in draws} == {True, False} and {d[3] for d in draws} == {False}
    assert sample_crop_flip(sample_generator(0, 0, 0), 0, False, False) == (0, 0, False, False)


def test_normalize_closed_form():
    x = rand_u8(2, 3, 4, 4)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    out = normalize(x, mean, std, "standardize")
    ref = (x.double() / 255 - mean.double().view(3, 1, 1)) / std.double().view(3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-6)
    assert torch.allclose(normalize(x, [0.0] * 3, [1.0] * 3, "unit"), x.float() / 255)
    assert torch.equal(normalize(x, mean, std, "none"), x.float())
    with pytest.raises(ValueError):
        normalize(x, mean, std, "zscore")


@pytest.mark.parametrize("shape", [(3, 40, 24), (1, 20, 36), (3, 16, 16)])
@pytest.mark.parametrize("kw", [dict(resized_crop=0.35, rotation=15.0),
                                dict(resized_crop=0.0, rotation=0.0)])
def test_augment_sample_shapes_and_determinism(shape, kw):
    img = rand_u8(*shape)
    out = augment_sample(img, sample_generator(0, 0, 7), out_size=16, **kw)
    assert out.shape == (shape[0], 16, 16) and out.dtype == torch.uint8
    again = augment_sample(img, sample_generator(0, 0, 7), out_size=16, **kw)
    assert torch.equal(out, again)


def test_identity_and_resize_paths():
    img = rand_u8(3, 16, 16)
    gen = sample_generator(0, 0, 0)
    state = gen.get_state()
    out = augment_sample(img, gen, out_size=16, resized_crop=0, rotation=0)
    assert out is img and torch.equal(gen.get_state(), state)  # no draws, no copy
    assert resize_sample(img, 16) is img
    rect = resize_sample(rand_u8(1, 30, 10), 8)
    assert rect.shape == (1, 8, 8)
    const = torch.full((3, 20, 20), 77, dtype=torch.uint8)
    assert (resize_sample(const, 8) == 77).all()
    rotated = augment_sample(const, gen, out_size=20, resized_crop=0, rotation=10)
    assert rotated[:, 10, 10].tolist() == [77, 77, 77]  # center unchanged, corners filled
    assert (rotated[:, 0, 0] == 0).all()


def sequential_jitter(img, b, c, s):
    """torchvision's brightness -> contrast -> saturation on one float image in 0..1."""
    img = TF.adjust_contrast(TF.adjust_brightness(img, b), c)
    return TF.adjust_saturation(img, s) if img.shape[0] == 3 else img


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_batch_matches_torchvision_sequence(channels):
    # mid-range pixels and factors near 1: no intermediate value leaves 0..255, where the fused
    # matrix and torchvision's step-by-step clamps agree exactly (up to float rounding)
    x = (rand_u8(6, channels, 9, 7) // 4 + 96).to(torch.uint8)
    factors = torch.tensor([jitter_factors(sample_generator(0, 0, i), 0.2) for i in range(6)])
    ref = torch.stack([sequential_jitter(img.float() / 255, *f.tolist())
                       for img, f in zip(x, factors)])
    mean, std = torch.rand(channels) * 0.5, torch.rand(channels) + 0.5
    for layout in (torch.contiguous_format, torch.channels_last):
        for chunk in (0, 4):
            got = normalize(x.contiguous(memory_format=layout), mean, std, "standardize",
                            jitter=factors, chunk=chunk)
            want = (ref - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
            assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4)
    plain = normalize(x, 0, 1, "none", jitter=torch.ones(6, 3))
    assert torch.allclose(plain, x.float(), atol=1e-4)  # factors 1: identity
    saturated = normalize(x, 0, 1, "none", jitter=torch.tensor([[3.0, 1.0, 1.0]] * 6))
    assert saturated.max() == 255 and saturated.min() >= 0  # clamped once, at the end


def test_jitter_factors_range():
    draws = torch.tensor([jitter_factors(sample_generator(0, 1, i), 0.3) for i in range(300)])
    assert draws.min() >= 0.7 and draws.max() <= 1.3 and draws.std(0).min() > 0.1
    assert jitter_factors(sample_generator(0, 0, 0), 2.0)[0] >= 0.0


@pytest.mark.parametrize("flags", [(True, False), (False, True), (True, True), (False, False)])
def test_crop_flip_without_padding_is_flips_only(flags):
    x = rand_u8(5, 3, 6, 9)
    gen = torch.Generator().manual_seed(3)
    hflips, vflips = (torch.rand(5, generator=gen) < 0.5) & flags[0], torch.zeros(5, dtype=bool)
    vflips |= (torch.rand(5, generator=gen) < 0.5) & flags[1]
    offsets = torch.zeros(5, 2, dtype=torch.long)
    assert torch.equal(crop_flip_batch(x, offsets, hflips, vflips, 0),
                       naive_crop_flip(x, offsets, hflips, vflips, 0))


def test_normalize_channels_last_output():
    x = rand_u8(2, 3, 5, 4)
    out = normalize(x, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0], "standardize", channels_last=True,
                    chunk=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalize(x, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0], "standardize"))
