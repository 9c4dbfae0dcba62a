"""Pure augmentation and normalisation; all randomness comes from an explicit torch.Generator.

Two stages, so results never depend on which loader worker ran:
1. per sample, in a loader worker, with `gen = sample_generator(seed, epoch, sample_id)`:
       img = augment_sample(img, gen, out_size=32, resized_crop=0.35, rotation=0)
       b, c, s = jitter_factors(gen, 0.2)                       # parameters only
       dy, dx, hflip, vflip = sample_crop_flip(gen, pad=4, hflip=True, vflip=False)
   (eval: `img = resize_sample(img, out_size)`)
2. per batch, vectorised, on CPU or GPU:
       x = crop_flip_batch(x, offsets, hflips, vflips, pad=4)   # (B, C, H, W), dtype kept
       x = normalize(x, mean, std, "standardize", jitter=factors)  # float32, jitter fused
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def sample_generator(seed: int, epoch: int, sample_id: int | str) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, epoch, sample_id): same in every process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One float uniform in [low, high) from gen."""
    return low + (high - low) * torch.rand((), generator=gen).item()


def randint(gen: torch.Generator, high: int) -> int:
    """One int uniform in [0, high] (inclusive) from gen."""
    return int(torch.randint(0, high + 1, (), generator=gen).item())


def resized_crop_box(
    gen: torch.Generator, height: int, width: int, min_scale: float
) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params, ratio 3/4..4/3, from gen."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * uniform(gen, min_scale, 1.0)
        aspect = math.exp(uniform(gen, *log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return randint(gen, height - h), randint(gen, width - w), h, w
    # fallback: the central crop with the ratio clamped to 3/4..4/3
    ratio = min(max(width / height, 3 / 4), 4 / 3)
    w, h = (width, round(width / ratio)) if width / height <= ratio else (
        round(height * ratio), height)
    return (height - h) // 2, (width - w) // 2, h, w


def resize_sample(img: torch.Tensor, out_size: int) -> torch.Tensor:
    """(C, H, W) -> (C, out_size, out_size): shorter side resized (antialias), center crop."""
    if img.shape[-2:] == (out_size, out_size):
        return img
    img = TF.resize(img, [out_size], antialias=True)
    return TF.center_crop(img, [out_size, out_size])


def jitter_factors(gen: torch.Generator, strength: float) -> tuple[float, float, float]:
    """(brightness, contrast, saturation) factors, each uniform in [max(0, 1-s), 1+s]."""
    low, high = max(0.0, 1.0 - strength), 1.0 + strength
    brightness, contrast, saturation = (uniform(gen, low, high) for _ in range(3))
    return brightness, contrast, saturation


GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as in torchvision's rgb_to_grayscale


def jitter_matrix(channel_means: torch.Tensor, factors: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (B, C, C), t (B, C)) with jitter(x) = A x + t per pixel (0..255), before clamping.

    torchvision's brightness b -> contrast c -> saturation s is linear in the pixels:
    y = c*b*(s*x + (1-s)*gray(x)) + (1-c)*b*mean(gray(x)); for 1 channel gray(x) = x (no
    saturation). channel_means: (B, C) per-image means of x; factors: (B, 3) from jitter_factors.
    """
    B, C = channel_means.shape
    b, c, s = factors.to(channel_means.device, torch.float32).unbind(1)
    gray = torch.tensor(GRAY if C == 3 else (1.0,), device=channel_means.device)
    eye = torch.eye(C, device=channel_means.device)
    matrix = (s * c * b)[:, None, None] * eye + ((1 - s) * c * b)[:, None, None] * gray
    offset = ((1 - c) * b * (channel_means @ gray))[:, None].expand(B, C)
    return matrix, offset


def augment_sample(
    img: torch.Tensor,
    gen: torch.Generator,
    *,
    out_size: int,
    resized_crop: float,
    rotation: float,
) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, out_size, out_size): resized crop or resize, then rotate.

    Args:
        resized_crop: min area scale of the random-resized crop (0 = plain resize_sample).
        rotation: max degrees; the angle is uniform in +-rotation (bilinear, fill 0).
    Colour jitter is not here: its factors are drawn next (jitter_factors) and applied per
    batch on the training device (color_jitter_batch).
    """
    if resized_crop > 0:
        top, left, h, w = resized_crop_box(gen, img.shape[-2], img.shape[-1], resized_crop)
        img = TF.resized_crop(img, top, left, h, w, [out_size, out_size], antialias=True)
    else:
        img = resize_sample(img, out_size)
    if rotation > 0:
        angle = uniform(gen, -rotation, rotation)
        img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
    return img


def sample_crop_flip(
    gen: torch.Generator, pad: int, hflip: bool, vflip: bool
) -> tuple[int, int, bool, bool]:
    """(dy, dx, hflip, vflip) for crop_flip_batch: offsets in [0, 2*pad], flips with p=0.5."""
    u = torch.rand(4, generator=gen).tolist()  # always 4 draws: the stream does not depend on flags
    dy = min(int(u[0] * (2 * pad + 1)), 2 * pad)
    dx = min(int(u[1] * (2 * pad + 1)), 2 * pad)
    return dy, dx, hflip and u[2] < 0.5, vflip and u[3] < 0.5


def crop_flip_index(
    offsets: torch.Tensor, flips: torch.Tensor, size: int, pad: int
) -> torch.Tensor:
    """(B, size) source indices of reflect-pad by `pad`, crop at `offsets`, flip where flagged."""
    i = torch.arange(size, device=offsets.device)
    i = torch.where(flips[:, None], size - 1 - i, i)  # (B, size) position in the crop
    k = i + offsets[:, None] - pad  # index into the unpadded image, may be out of range
    k = k.abs()  # reflect at 0: -1 -> 1 (F.pad "reflect" excludes the edge pixel)
    return torch.where(k > size - 1, 2 * (size - 1) - k, k)  # reflect at size - 1


def crop_flip_batch(
    x: torch.Tensor,
    offsets: torch.Tensor,
    hflips: torch.Tensor,
    vflips: torch.Tensor,
    pad: int,
) -> torch.Tensor:
    """Per sample: reflect-pad by `pad`, crop H x W at offsets (dy, dx), flip; dtype kept.

    Vectorised as two gathers with reflected indices, so no padded copy is built and uint8
    stays uint8 (F.pad's reflect mode needs float on some versions).
    Args:
        x: (B, C, H, W) images; offsets: (B, 2) long (dy, dx) in [0, 2*pad];
        hflips, vflips: (B,) bool.
    """
    B, C, H, W = x.shape
    if pad < 0 or pad >= min(H, W):
        raise ValueError(f"pad must be in [0, {min(H, W) - 1}] for {H}x{W} images, got {pad}")
    offsets = offsets.to(device=x.device, dtype=torch.long)
    rows = crop_flip_index(offsets[:, 0], vflips.to(x.device, torch.bool), H, pad)  # (B, H)
    cols = crop_flip_index(offsets[:, 1], hflips.to(x.device, torch.bool), W, pad)  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
    scaling: str, channels_last: bool = False, jitter: torch.Tensor | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32: standardize (x/255 - mean)/std | unit x/255 | none (0..255).

    jitter: (B, 3) colour-jitter factors (jitter_factors), applied first as one colour matrix
    per image (jitter_matrix: one batched matrix product) and clamped once to 0..255
    (torchvision clamps after each of its three steps: the two differ only where an
    intermediate value leaves 0..255). The scaling is one fused multiply-add written straight
    in the requested memory format. chunk: images per pass (0 = all at once; on CPU a few
    images at a time stay in cache, ~2x faster than passes over a whole large batch).
    """
    if scaling not in ("standardize", "unit", "none"):
        raise ValueError(f"unknown scaling {scaling!r}; choose from standardize, unit, none")
    B, C, H, W = x.shape
    scale, shift = _scaling(scaling, C, x.device, mean, std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    step = chunk if chunk > 0 else max(B, 1)
    for i in range(0, B, step):
        part = x[i:i + step].float()
        if jitter is not None:  # planar (B, C, H*W): the colour matrix is a small batched GEMM
            matrix, offset = jitter_matrix(part.mean((2, 3)), jitter[i:i + step])
            part = torch.baddbmm(offset[:, :, None], matrix, part.reshape(len(part), C, H * W))
            part = part.clamp_(0.0, 255.0).view(-1, C, H, W)
        torch.addcmul(shift, part, scale, out=out[i:i + step])
    return out


def _scaling(scaling: str, C: int, device, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1), with output = x * scale + shift for x in 0..255."""
    if scaling == "standardize":
        mean = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        return (1.0 / (255.0 * std)).expand(1, C, 1, 1), (-mean / std).expand(1, C, 1, 1)
    one = torch.ones(1, C, 1, 1, device=device)
    return (one / 255.0 if scaling == "unit" else one), one * 0.0


def apply_policy(img: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
    """uint8 (C, H, W) through torchvision's RandAugment / TrivialAugmentWide, seeded from gen.

    torchvision's v2 policies draw from the global RNG, so they run inside fork_rng() with a
    seed taken from `gen`: the result depends only on (seed, epoch, sample), and the caller's
    global RNG state (dropout, ...) is untouched.
    """
    from torchvision.transforms import v2

    if policy == "none":
        return img
    if policy not in ("randaugment", "trivialaugment"):
        raise ValueError(f"unknown policy {policy!r}; choose from none, randaugment, "
                         "trivialaugment")
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    transform = v2.RandAugment() if policy == "randaugment" else v2.TrivialAugmentWide()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def random_erase(img: torch.Tensor, gen: torch.Generator, prob: float) -> torch.Tensor:
    """With probability prob, fill one box (2%-33% of the area, ratio 0.3-3.3) with noise.

    The box parameters are those of torchvision's RandomErasing defaults (value="random": uniform
    uint8 noise), drawn from gen.
    """
    if prob <= 0 or uniform(gen, 0.0, 1.0) >= prob:
        return img
    C, H, W = img.shape
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        area = H * W * uniform(gen, 0.02, 0.33)
        aspect = math.exp(uniform(gen, *log_ratio))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < H and 0 < w < W:
            top, left = randint(gen, H - h), randint(gen, W - w)
            img = img.clone()
            noise = torch.randint(0, 256, (C, h, w), generator=gen, dtype=torch.int32)
            img[:, top:top + h, left:left + w] = noise.to(img.dtype)
            return img
    return img
