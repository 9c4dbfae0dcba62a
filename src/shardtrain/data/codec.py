"""Encode images into shard members and decode them back to uint8 tensors.

A sample's image member is one of:
  npy  raw uint8 array saved with np.save, shape (H, W) for 1 channel or (H, W, 3);
  png  lossless PNG of the stored pixels;
  jpg  the source file's JPEG bytes unchanged (baseline, already in the target mode, no EXIF
       rotation, no resize), or a quality-95 re-encode when `fmt="jpg"` is forced.

Usage (what pack workers and the loader call):
    ext, data, pixels = encode_sample(bytes_or_array, channels=3, fmt="auto", image_size=0)
    img = decode_image(data, ext, channels=3)   # torch.uint8 (C, H, W)
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_jpeg, decode_png

SMALL_PIXELS = 64 * 64  # "auto" stores images up to 64x64 as raw npy: decoding PNG costs more
JPEG_QUALITY = 95
_MODES = {1: "L", 3: "RGB"}


def _scale_16bit(img: Image.Image) -> Image.Image:
    """I;16 / I / F -> L by scaling the full range to 8 bits (clipping would saturate)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64) * (255.0 if float(arr.max(initial=0)) <= 1.0 else 1.0)
    else:
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any common PIL mode to "L" (channels=1) or "RGB" (channels=3), EXIF rotation applied.

    Transparency is composited on white; CMYK/YCbCr go through RGB; 16-bit gray is scaled.
    """
    target = _MODES[channels]
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _scale_16bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P without transparency
    return img if img.mode == target else img.convert(target)


def _open_checked(data: bytes) -> Image.Image:
    """Open and fully load an image, turning bombs/truncation/garbage into ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
        raise ValueError(f"cannot decode image: {e}") from None
    return img


def _array_to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> the same with `channels` channels."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"unsupported array dtype/shape {arr.dtype} {arr.shape}")
    if channels == 1 and arr.ndim == 3:
        return np.asarray(Image.fromarray(arr, "RGB").convert("L"))
    if channels == 3 and arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    return arr


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy header (format 1.0 or 2.0), parsed once per
    distinct header: np.load's literal_eval of it cost ~100 us per 28x28 sample, most of the
    decode."""
    f = io.BytesIO(header)
    if np.lib.format.read_magic(f) == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def load_npy(data: bytes) -> np.ndarray:
    """The uint8 array of a .npy member (read-only, no copy); ValueError("corrupt npy sample:
    ...") otherwise.

    Never numpy's own messages: for a missing header or an object dtype they suggest loading
    "unsafely using allow_pickle", and a damaged or hostile sample must never be unpickled."""
    sizes = {b"\x01\x00": 2, b"\x02\x00": 4}  # format version -> bytes of the header length
    if data[:6] != b"\x93NUMPY" or data[6:8] not in sizes:
        raise ValueError("corrupt npy sample: no .npy header")
    n = sizes[data[6:8]]
    start = 8 + n + int.from_bytes(data[8:8 + n], "little")
    try:
        shape, fortran, dtype = _npy_header(data[:start])
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise ValueError(f"corrupt npy sample: unreadable header ({type(e).__name__})") from None
    if dtype.hasobject:
        raise ValueError("corrupt npy sample: object dtype (images are uint8)")
    try:
        arr = np.frombuffer(data, dtype, count=math.prod(shape), offset=start)
    except ValueError:
        raise ValueError("corrupt npy sample: shorter than its header says") from None
    return arr.reshape(shape, order="F" if fortran else "C")


_PNG_COLOUR_TYPE = {1: 0, 3: 2}  # IHDR colour type: 0 gray, 2 RGB (8-bit, no palette, no alpha)
_JPEG_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman: what libjpeg decodes


def _plain_png(data: bytes, channels: int) -> bool:
    """An 8-bit gray/RGB PNG (as pack writes) whose pixels PIL would return unchanged."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26:
        return False
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return (depth == 8 and colour == _PNG_COLOUR_TYPE[channels]
            and width * height <= Image.MAX_IMAGE_PIXELS
            and b"tRNS" not in data and b"eXIf" not in data)  # transparency, EXIF -> PIL path


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, height, width, components) from the JPEG's frame header, or None."""
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width, comps = struct.unpack(">HHB", data[i + 5:i + 10])
            return marker, height, width, comps
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _plain_jpeg(data: bytes, channels: int) -> bool:
    """A gray/YCbCr JPEG with no EXIF (so no rotation) in the requested channel count."""
    if data[:2] != b"\xff\xd8" or b"Exif" in data or b"Adobe" in data:
        return False
    frame = _jpeg_frame(data)
    return (frame is not None and frame[0] in _JPEG_SOF and frame[3] == channels
            and frame[1] * frame[2] <= Image.MAX_IMAGE_PIXELS)


def _decode_fast(data: bytes, ext: str, channels: int) -> torch.Tensor | None:
    """libpng / libjpeg-turbo through torchvision.io, for members that PIL would decode to the
    same pixels (what pack writes): per image ~3x faster than the PIL path for 28 px PNG and
    100 px JPEG (timed by hand; bench/loader.py has the loader-level figures). None -> take
    the PIL path (other modes, EXIF, errors with a reason)."""
    if not ((ext == "png" and _plain_png(data, channels))
            or (ext == "jpg" and _plain_jpeg(data, channels))):
        return None
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        img = decode_png(buf) if ext == "png" else decode_jpeg(buf)
    except RuntimeError:
        return None
    return img if img.dtype == torch.uint8 and img.shape[0] == channels else None


def decode_image(data: bytes, ext: str, channels: int) -> torch.Tensor:
    """Decode one image member into a uint8 tensor (C, H, W); ValueError on undecodable data."""
    fast = _decode_fast(data, ext, channels)
    if fast is not None:
        return fast
    if ext == "npy":
        arr = _array_to_channels(load_npy(data), channels)
    else:  # png, jpg or any file PIL recognises by its content
        arr = np.asarray(to_mode(_open_checked(data), channels))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # (C, H, W), writable


def _resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _shrink(img: Image.Image, max_size: int) -> Image.Image:
    """Resize so that the longer side is max_size (aspect kept; bicubic, antialiased)."""
    w, h = img.size
    scale = max_size / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _keep_jpeg(raw: bytes, img: Image.Image, channels: int, resized: bool) -> bool:
    """True when the original JPEG bytes can be stored unchanged (no re-encode loss)."""
    return (
        img.format == "JPEG"
        and not resized
        and img.mode == _MODES[channels]
        and not img.info.get("progressive")
        and not img.info.get("progression")
        and img.getexif().get(0x0112, 1) == 1  # EXIF Orientation: 1 = upright
        and raw[:2] == b"\xff\xd8"
    )


def _encode_array(arr: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "npy":
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    elif ext == "png":
        Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _fit(img: Image.Image, image_size: int, max_size: int) -> tuple[Image.Image, str]:
    """(img sized for the shard, what was done: "resized" | "shrunk" | "").

    image_size: resize + centre-crop to that square unless already so; else max_size: shrink
    when the longer side exceeds it."""
    if image_size:
        if img.size == (image_size, image_size):
            return img, ""
        return _resize(img, image_size), "resized"
    if max_size and max(img.size) > max_size:
        return _shrink(img, max_size), "shrunk"
    return img, ""


def encode_sample(
    src: bytes | str | Path | np.ndarray, *, channels: int, fmt: str = "auto",
    image_size: int = 0, max_size: int = 0,
) -> tuple[str, bytes, np.ndarray]:
    """Encode a file (its path or bytes) or a uint8 array into (ext, member bytes, stored pixels
    (H, W[, 3])).

    image_size: resize + centre-crop to a square; else max_size: shrink images whose longer
    side exceeds it (aspect kept; a JPEG source stays JPEG, re-encoded at JPEG_QUALITY, since
    PNG would be several times larger and slower to decode). Raises ValueError with a reason
    when the input cannot be used.
    """
    if fmt not in ("auto", "npy", "png", "jpg"):
        raise ValueError(f"unknown format {fmt!r}")
    if isinstance(src, np.ndarray):
        raw, arr = None, _array_to_channels(src, channels)
        fitted, change = _fit(Image.fromarray(arr), image_size, max_size)
        arr = np.asarray(fitted) if change else arr
    else:
        raw = src if isinstance(src, bytes) else Path(src).read_bytes()
        if not raw:
            raise ValueError("empty file")
        img = _open_checked(raw)
        conv, change = _fit(to_mode(img, channels), image_size, max_size)
        arr = np.asarray(conv)
        if fmt in ("auto", "jpg") and _keep_jpeg(raw, img, channels, bool(change)):
            if fmt == "jpg" or arr.shape[0] * arr.shape[1] > SMALL_PIXELS:
                return "jpg", raw, arr
        if change == "shrunk" and fmt == "auto" and img.format == "JPEG":
            fmt = "jpg"
    if fmt == "auto":
        small = arr.shape[0] * arr.shape[1] <= SMALL_PIXELS
        fmt = "npy" if (raw is None or small) else "png"
    data = _encode_array(arr, fmt)
    if fmt == "jpg":  # statistics must describe what is stored, which is lossy here
        arr = decode_image(data, "jpg", channels).permute(1, 2, 0).numpy()
        arr = arr[:, :, 0] if channels == 1 else arr
    return fmt, data, arr
