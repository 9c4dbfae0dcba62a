"""Generated photographs for the JPEG benchmarks: natural-image statistics, camera-like sizes.

Flat colours or smooth noise decode and compress unlike photographs (a flat JPEG is mostly empty
DCT blocks). These images follow the "dead leaves" model of natural scenes (Lee, Mumford & Huang
2001): opaque objects whose sizes follow a power law (p(r) ~ r^-3) occlude each other, which gives
the scale invariance, sharp edges and ~1/f^2 power spectrum of real photographs; each object gets
a colour from a lognormal luminance with moderate chroma, a 1/f texture modulates it, and a smooth
illumination field, lens blur and sensor noise finish the picture. Sizes are those of
Flickr-style photographs (~500x375, landscape and portrait), saved as baseline JPEG quality 90
with 4:2:0 chroma subsampling (as cameras and Flickr's resized copies), ~70-80 KB each.

    from photos import write_photo_folder
    root = write_photo_folder(Path("photos"), n=3000, classes=10)  # root/train/c<k>/<i>.jpg
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZES = [(500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (480, 360), (333, 500)]


def fractal_noise(rng: np.random.Generator, h: int, w: int, beta: float = 1.0) -> np.ndarray:
    """Gaussian noise with amplitude spectrum 1/f^beta, zero mean, unit std, (h, w) float32."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1)))
    field = np.fft.irfft2(spectrum / f**beta, s=(h, w))
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def photo(rng: np.random.Generator, width: int, height: int, tint: np.ndarray) -> np.ndarray:
    """One (height, width, 3) uint8 dead-leaves photograph; `tint` biases the palette (class)."""
    sky = [fractal_noise(rng, height // 16, width // 16, 2.0) for _ in range(3)]  # background
    base = np.exp(rng.normal(-0.5, 0.3)) * tint * np.exp(0.15 * np.stack(sky, -1))
    canvas = Image.fromarray(np.clip(255 * base, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    r_min, r_max = 3.0, 0.6 * min(width, height)
    n = int(rng.integers(300, 700))
    u = rng.random(n)  # inverse CDF of p(r) ~ r^-3 on [r_min, r_max], biggest drawn first
    radii = np.sort((r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5)[::-1]
    for r in radii:
        lum = np.exp(rng.normal(-0.7, 0.5))  # lognormal luminance, most objects mid-dark
        rgb = np.clip(lum * tint * np.exp(rng.normal(0.0, 0.25, 3)), 0.0, 1.0)
        cx, cy = rng.uniform(-r, width + r), rng.uniform(-r, height + r)
        aspect = np.exp(rng.normal(0.0, 0.4))
        box = (cx - r * aspect, cy - r / aspect, cx + r * aspect, cy + r / aspect)
        colour = tuple(int(255 * c) for c in rgb)
        if rng.random() < 0.7:
            draw.ellipse(box, fill=colour)
        else:  # a rotated quadrilateral
            angles = np.sort(rng.uniform(0, 2 * np.pi, 4))
            pts = [(cx + r * aspect * np.cos(a), cy + r / aspect * np.sin(a)) for a in angles]
            draw.polygon(pts, fill=colour)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))  # lens
    img = np.asarray(canvas, dtype=np.float32)
    texture = 1.0 + 0.12 * fractal_noise(rng, height, width, 1.0)[..., None]
    light = 1.0 + 0.3 * fractal_noise(rng, height // 8, width // 8, 2.0)  # smooth illumination
    light = np.asarray(Image.fromarray(light).resize((width, height), Image.BILINEAR))[..., None]
    img = img * texture * light + rng.normal(0.0, 2.0, img.shape).astype(np.float32)  # sensor
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def write_photo_folder(root: Path, n: int, classes: int = 10, seed: int = 0,
                       scale: float = 1.0) -> Path:
    """n photographs as root/train/c<k>/<i>.jpg (an ImageFolder and a `shardtrain pack` source);
    `scale` shrinks the sizes (e.g. 0.32 for 160x120 thumbnails). Written once (root/done)."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0.5, 1.5, (classes, 3))
    for c in range(classes):
        (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        w, h = max(16, round(w * scale)), max(16, round(h * scale))
        c = i % classes
        (root / "train" / f"c{c}" / f"{i:06d}.jpg").write_bytes(
            jpeg_bytes(photo(rng, w, h, tints[c])))
    (root / "done").touch()
    return root


def copies_with_comments(src: Path, dst: Path, n: int) -> Path:
    """dst/train/<class>/<i>.jpg: n distinct files cycling over src's photos, each made unique by
    a JPEG comment (COM) segment holding its number (same pixels, different bytes, so `pack`
    does not drop them as duplicates): a large data set without generating every image."""
    if (dst / "done").exists():
        return dst
    files = sorted((src / "train").glob("*/*.jpg"))
    datas = [(f.parent.name, f.read_bytes()) for f in files]
    for cls, _ in datas:
        (dst / "train" / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls, data = datas[i % len(datas)]
        text = f"copy {i}".encode()
        com = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
        (dst / "train" / cls / f"{i:07d}.jpg").write_bytes(data[:2] + com + data[2:])
    (dst / "done").touch()
    return dst
