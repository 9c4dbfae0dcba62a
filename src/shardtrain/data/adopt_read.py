"""Stream one foreign WebDataset shard: members, offsets, labels, sha256 (for `shardtrain index`).

    base, names = list_shards("https://host/ds/train-{000000..000009}.tar")
    scan = scan_shard(base, names[0], label_key="", image_exts=("jpg", "png"), budget=[500])
    scan.keys, scan.offsets, scan.raw_labels, scan.sha256

The tar is read as a stream (`tarfile` mode "r|*", gzip too) through a hashing reader, so a
shard is fetched once and never held in memory. A sample is the run of members sharing a key
(WebDataset's rule: the member path up to the first dot of its last component).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardtrain.data.remote import Retry, filesystem, is_url, join, local_path, with_retries
from shardtrain.errors import DataError, UserError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "npy", "ppm", "pgm", "pbm", "bmp", "tif", "tiff")
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
LABEL_EXTS = ("cls", "json", "txt")


def shard_stem(name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_shards(source: str) -> tuple[str, list[str]]:
    """(folder or URL of the shards, sorted shard file names) for a folder, URL or brace
    pattern (`.../train-{000..009}.tar`)."""
    if "{" in source:
        from braceexpand import braceexpand

        base, _, pattern = source.rstrip("/").rpartition("/")
        return base or ".", sorted(braceexpand(pattern))
    if is_url(source):
        fs, path = filesystem(source)
        entries = with_retries("listing", source, Retry(), lambda: fs.ls(path, detail=False))
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    else:
        folder = local_path(source)
        if not folder.is_dir():
            raise UserError(f"not a folder: {source} (give a folder, URL or brace pattern)")
        names = [p.name for p in folder.iterdir() if p.is_file()]
    names = sorted(n for n in set(names) if n.endswith(SHARD_SUFFIXES))
    if not names:
        raise UserError(f"no .tar/.tar.gz shards in {source}")
    return source.rstrip("/"), names


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardScan:
    """What one shard holds: per usable sample, key, image member and raw label."""

    name: str
    sha256: str = ""
    nbytes: int = 0
    keys: list = field(default_factory=list)
    exts: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    raw_labels: list = field(default_factory=list)  # int ids or class-name strings
    skipped: list = field(default_factory=list)
    stat_images: list = field(default_factory=list)  # (bytes, ext) for mean/std/size

    def keep(self, rows: list[int]) -> None:
        for col in (self.keys, self.exts, self.offsets, self.sizes, self.raw_labels):
            col[:] = [col[i] for i in rows]

    def write_sidecar(self, folder: Path, labels: list[int]) -> dict:
        side = {"keys": self.keys, "labels": labels, "exts": self.exts,
                "offsets": self.offsets, "sizes": self.sizes}
        data = json.dumps(side, separators=(",", ":")).encode()
        path = folder / f"{shard_stem(self.name)}.samples.json"
        path.write_bytes(data)
        return {"file": self.name, "samples_file": path.name, "num_samples": len(labels),
                "sha256": self.sha256, "samples_sha256": hashlib.sha256(data).hexdigest(),
                "bytes": self.nbytes}


def raw_label(members: dict, label_key: str):
    """The sample's label as an int id or a class name; None when it has none."""
    if label_key:
        if "json" not in members:
            return None
        value = json.loads(members["json"][2]).get(label_key)
    elif "cls" in members:
        value = members["cls"][2].decode("utf-8", "replace").strip()
        value = int(value) if value.lstrip("-").isdigit() else value
    elif "txt" in members:
        value = members["txt"][2].decode("utf-8", "replace").strip()
    else:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        return None
    return value


def add_sample(scan: ShardScan, key: str, members: dict, label_key: str,
               image_exts: tuple[str, ...], budget: list[int]) -> None:
    image = next((e for e in image_exts if e in members), None)
    try:
        label = raw_label(members, label_key)
    except (ValueError, AttributeError) as e:
        label, reason = None, f"unreadable label ({e})"
    else:
        reason = "no label (.cls, .txt, or .json with --label-key)" if label_key == "" else \
            f"no .json field {label_key!r}"
    if image is None or label is None:
        why = f"no image member ({', '.join(image_exts[:4])}, ...)" if image is None else reason
        scan.skipped.append({"path": f"{scan.name}:{key}", "reason": why})
        return
    offset, size, data = members[image]
    scan.keys.append(key)
    scan.exts.append(image)
    scan.offsets.append(offset)
    scan.sizes.append(size)
    scan.raw_labels.append(label)
    if budget[0] > 0 and data is not None:
        scan.stat_images.append((data, image))
        budget[0] -= 1


def read_members(stream, scan: ShardScan, label_key: str, image_exts: tuple[str, ...],
                 budget: list[int]) -> None:
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for m in tar:
            match = KEY_EXT.match(m.name)
            if not m.isfile() or match is None:
                continue
            k, ext = match.group(1), match.group(2).lower()
            if k != key:
                if key is not None:
                    add_sample(scan, key, members, label_key, image_exts, budget)
                key, members = k, {}
            wanted = ext in LABEL_EXTS or (ext in image_exts and budget[0] > 0)
            data = tar.extractfile(m).read() if wanted else None
            members[ext] = (m.offset_data, m.size, data)
        if key is not None:
            add_sample(scan, key, members, label_key, image_exts, budget)


def scan_shard(base: str, name: str, label_key: str, image_exts: tuple[str, ...],
               budget: list[int], progress: bool = False) -> ShardScan:
    """Stream one shard once: its samples, sha256 and size (retried from the start if remote)."""
    url = join(base, name)

    def attempt() -> ShardScan:
        scan, left = ShardScan(name), list(budget)
        raw = open_stream(url)
        try:
            stream = HashingReader(raw)
            read_members(stream, scan, label_key, image_exts, left)
            stream.drain()  # tar end padding: the sha256 covers the whole file
        except (tarfile.ReadError, zlib.error, EOFError) as e:
            if is_url(url) and isinstance(e, EOFError):
                raise
            raise DataError(f"{name}: not a readable tar archive ({e})") from None
        finally:
            raw.close()
        scan.sha256, scan.nbytes = stream.sha256.hexdigest(), stream.nbytes
        budget[0] = left[0]
        return scan

    scan = with_retries("indexing", url, Retry(), attempt) if is_url(url) else attempt()
    if progress:
        print(f"  {name}: {len(scan.keys)} samples, {len(scan.skipped)} skipped", flush=True)
    return scan


def open_stream(url: str):
    if not is_url(url):
        try:
            return open(local_path(url), "rb")
        except OSError as e:
            raise DataError(f"{url}: {e.strerror}") from None
    fs, path = filesystem(url)
    stream = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fs.open(path, "rb", **stream)


def image_stats(images: list[tuple[bytes, str]], channels: int) -> dict:
    """channels, mean/std (0..1) and the size range of a sample of images."""
    from shardtrain.data.codec import decode_image

    if not channels:
        channels = 3 if any(color(data, ext) for data, ext in images) else 1
    sums, sqs, pixels, sizes = np.zeros(channels), np.zeros(channels), 0, []
    for data, ext in images:
        try:
            img = decode_image(data, ext, channels)  # (C, H, W)
        except ValueError:
            continue
        x = img.double().reshape(channels, -1)  # (C, HW)
        sums, sqs, pixels = sums + x.sum(1).numpy(), sqs + (x * x).sum(1).numpy(), \
            pixels + x.shape[1]
        sizes.append(list(img.shape[1:]))
    if not sizes:
        raise UserError("no decodable image in the sampled train samples")
    mean = sums / pixels / 255.0
    std = np.sqrt(np.maximum(sqs / pixels / 65025.0 - mean * mean, 0.0))
    lo, hi = [min(s[i] for s in sizes) for i in (0, 1)], [max(s[i] for s in sizes) for i in (0, 1)]
    return {"channels": channels, "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std], "image_size": lo if lo == hi else None,
            "range": {"min": lo, "max": hi}, "n": len(sizes)}


def color(data: bytes, ext: str) -> bool:
    """Whether an encoded image has colour channels (PIL mode / npy shape)."""
    try:
        if ext == "npy":
            from shardtrain.data.codec import load_npy

            return load_npy(data).ndim == 3  # the header parsed, the data viewed, not copied
        from PIL import Image

        return Image.open(io.BytesIO(data)).mode not in ("1", "L", "LA", "I", "I;16", "F")
    except Exception:  # noqa: BLE001 - an undecodable image says nothing about colour
        return False
