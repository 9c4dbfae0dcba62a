"""Read packed shards: load/validate index.json, sample tables, reads at sidecar offsets.

    from shardtrain.data.index import load_index, sample_table, ShardReader
    index = load_index("shards/fashion-mnist-12k")
    table = sample_table(index, "train")          # DataError now if a shard is missing/short
    reader = ShardReader(table.shard_paths)
    data = reader.read(table.shard[0], table.offset[0], table.size[0])   # image member bytes
`shardtrain info` / `shardtrain verify` live in data/inspect.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardtrain.errors import DataError, UserError


@dataclass
class SplitInfo:
    name: str
    num_samples: int
    class_counts: list[int]
    shards: list[dict]  # file, samples_file, num_samples, sha256, samples_sha256, bytes


@dataclass
class Index:
    root: Path
    name: str
    classes: list[str]
    channels: int
    image_size: tuple[int, int] | None
    mean: list[float]
    std: list[float]
    splits: dict[str, SplitInfo]
    raw: dict

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(
                f"split {name!r} not in {self.root}; available: {', '.join(self.splits)}"
            )
        return self.splits[name]


def index_hash(dir: str | Path) -> str:
    """sha256 of index.json's bytes: identifies a packed dataset version."""
    return hashlib.sha256((Path(dir) / "index.json").read_bytes()).hexdigest()


def _check_split(root: Path, name: str, sp: dict, n_classes: int) -> SplitInfo:
    shards = sp["shards"]
    for s in shards:
        for key in ("file", "samples_file"):
            if Path(s[key]).name != s[key] or s[key].startswith("."):
                raise DataError(f"{root}/index.json: bad shard file name {s[key]!r}")
    if sum(s["num_samples"] for s in shards) != sp["num_samples"]:
        raise DataError(f"{root}/index.json: split {name}: shard counts do not sum to num_samples")
    if len(sp["class_counts"]) != n_classes or sum(sp["class_counts"]) != sp["num_samples"]:
        raise DataError(f"{root}/index.json: split {name}: class_counts do not match")
    return SplitInfo(name, int(sp["num_samples"]), list(sp["class_counts"]), list(shards))


def load_index(dir: str | Path) -> Index:
    """Load and validate DIR/index.json (UserError/DataError with a one-line reason)."""
    root = Path(dir)
    path = root / "index.json"
    if not path.is_file():
        raise UserError(f"no index.json in {root}: pack a dataset first with `shardtrain pack`")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != 1:
            raise DataError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
        classes, size = list(raw["classes"]), raw["image_size"]
        splits = {k: _check_split(root, k, v, len(classes)) for k, v in raw["splits"].items()}
        if "train" not in splits or raw["channels"] not in (1, 3):
            raise DataError(f"{path}: no train split or bad channels")
        return Index(root, raw["name"], classes, raw["channels"], tuple(size) if size else None,
                     list(raw["mean"]), list(raw["std"]), splits, raw)  # fmt: skip
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: invalid index ({type(e).__name__}: {e})") from None


@dataclass
class SampleTable:
    """Per-sample arrays indexed by sample_id (position in the split)."""

    shard: np.ndarray  # int32, index into shard_paths
    offset: np.ndarray  # int64, byte offset of the image member's data in the uncompressed tar
    size: np.ndarray  # int64
    ext: list[str]
    label: np.ndarray  # int64
    shard_paths: list[Path]
    damaged: list[str] = field(default_factory=list)  # shards whose size differs from index.json

    def __len__(self) -> int:
        return len(self.label)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_sidecar(root: Path, s: dict, first_id: int, n_classes: int, damaged: list) -> dict:
    side_path, shard_path = root / s["samples_file"], root / s["file"]
    for p in (shard_path, side_path):
        if not p.is_file():
            raise DataError(f"{p.name}: missing from {root}")
    if shard_path.stat().st_size != s["bytes"]:
        damaged.append(f"{s['file']}: size {shard_path.stat().st_size} != {s['bytes']} bytes "
                       f"in index.json (truncated or replaced?)")  # fmt: skip
    data = side_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != s["samples_sha256"]:
        raise DataError(f"{s['samples_file']}: sha256 mismatch with index.json")
    side = json.loads(data)
    n = s["num_samples"]
    if any(len(side[k]) != n for k in ("keys", "labels", "exts", "offsets", "sizes")):
        raise DataError(f"{s['samples_file']}: expected {n} entries")
    if side["keys"] != [f"{first_id + i:08d}" for i in range(n)]:
        raise DataError(f"{s['samples_file']}: keys are not consecutive sample ids")
    if any(not 0 <= y < n_classes for y in side["labels"]):
        raise DataError(f"{s['samples_file']}: label out of range")
    return side


def sample_table(index: Index, split: str, check_checksums: bool = False) -> SampleTable:
    """Sample arrays of one split; DataError naming the first missing/mismatched file.

    Without check_checksums a shard whose size differs from index.json is not an error: it is
    listed in `damaged`, and the loader reads it up to the damage, skipping what it cannot read.
    """
    info = index.split(split)
    cols: dict[str, list] = {"shard": [], "offset": [], "size": [], "ext": [], "label": []}
    damaged: list[str] = []
    for i, s in enumerate(info.shards):
        side = load_sidecar(index.root, s, len(cols["label"]), len(index.classes), damaged)
        if damaged and check_checksums:
            raise DataError(damaged[0])
        if check_checksums and sha256_file(index.root / s["file"]) != s["sha256"]:
            raise DataError(f"{s['file']}: sha256 mismatch with index.json (corrupt shard; "
                            f"data.verify_checksums=false reads what is readable)")
        cols["shard"] += [i] * s["num_samples"]
        for col, key in (
            ("offset", "offsets"),
            ("size", "sizes"),
            ("ext", "exts"),
            ("label", "labels"),
        ):
            cols[col] += side[key]
    return SampleTable(
        np.asarray(cols["shard"], np.int32), np.asarray(cols["offset"], np.int64),
        np.asarray(cols["size"], np.int64), cols["ext"], np.asarray(cols["label"], np.int64),
        [index.root / s["file"] for s in info.shards], damaged,
    )  # fmt: skip


def decompress_readable(raw: bytes) -> bytes:
    """gunzip as much as is readable: a truncated .tar.gz still yields its first samples."""
    d, out = zlib.decompressobj(16 + zlib.MAX_WBITS), []
    for i in range(0, len(raw), 1 << 16):
        try:
            out.append(d.decompress(raw[i:i + (1 << 16)]))
        except zlib.error:
            break
    return b"".join(out)


class ShardReader:
    """Reads image members by (shard, offset, size). Opens files lazily, per process.

    Plain .tar shards: one kept-open handle per shard, seek + read. .tar.gz shards are
    decompressed whole into memory, the `cache_shards` most recent kept (LRU).
    """

    def __init__(self, paths: list[Path], cache_shards: int = 4):
        self.paths, self.cache_shards = [Path(p) for p in paths], cache_shards
        self._pid, self._files, self._cache = None, {}, OrderedDict()

    def __getstate__(self) -> dict:  # handles never cross a process boundary
        return {"paths": self.paths, "cache_shards": self.cache_shards}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["cache_shards"])

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share file offsets
            self._pid, self._files, self._cache = os.getpid(), {}, OrderedDict()

    def _gz_bytes(self, shard: int) -> bytes:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        data = decompress_readable(self.paths[shard].read_bytes())
        self._cache[shard] = data
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return data

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset` of the shard's uncompressed tar stream."""
        self._reset_if_forked()
        path = self.paths[shard]
        if path.name.endswith(".gz"):
            data = self._gz_bytes(shard)[offset : offset + size]
        else:
            f = self._files.get(shard)
            if f is None:  # unbuffered + pread: one syscall, no 8 KiB buffer refill per sample
                f = self._files[shard] = open(path, "rb", buffering=0)
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise DataError(f"{path.name}: short read at offset {offset} (truncated shard?)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self._cache = {}, OrderedDict()
