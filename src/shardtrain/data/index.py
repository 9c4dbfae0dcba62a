"""Read packed shards: load/validate index.json, sample tables, reads at sidecar offsets.

    from shardtrain.data.index import load_index, sample_table, ShardReader
    index = load_index("shards/fashion-mnist-12k")    # or "https://host/shards", "s3://b/shards"
    table = sample_table(index, "train")          # DataError now if a shard is missing/short
    reader = ShardReader(table.shard_paths, remote=table.remote)
    data = reader.read(table.shard[0], table.offset[0], table.size[0])   # image member bytes

The index and its sidecars are read from a folder or a URL (data/remote.py). Shards live next to
index.json, or where its `shard_base` says (a folder or URL: `shardtrain index --out` writes the
index elsewhere than the shards). Shards behind a URL are read through the node-local cache
(data/cache.py); the table's `remote` says how. `shardtrain info` / `verify`: data/inspect.py.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from shardtrain.data.cache import RemoteShards, ShardCache, ShardRef, default_cache_dir
from shardtrain.data.reader import ShardReader  # noqa: F401 - re-exported: index.ShardReader
from shardtrain.data.remote import NotFound, Retry, is_url, join, local_path, read_url
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
    location: str = ""  # the folder or URL holding index.json (and, by default, the shards)
    json_bytes: bytes = b""  # index.json as read: what its sha256 and W&B artifacts are made of

    @property
    def shard_base(self) -> str:
        """Folder or URL of the shards: index.json's `shard_base`, else its own location."""
        base = self.raw.get("shard_base") or self.location
        return base if is_url(base) else str(local_path(base))

    @property
    def adopted(self) -> bool:
        """Shards written by another tool (`shardtrain index`): keys are theirs, not ids."""
        return self.raw.get("source", {}).get("kind") == "adopted"

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise UserError(
                f"split {name!r} not in {self.root}; available: {', '.join(self.splits)}"
            )
        return self.splits[name]


def index_hash(dir: str | Path) -> str:
    """sha256 of index.json's bytes: identifies a packed dataset version."""
    return hashlib.sha256(index_bytes(str(dir))).hexdigest()


def index_bytes(location: str) -> bytes:
    if is_url(location):
        return remote_index_bytes(location)
    path = local_path(location) / "index.json"
    if not path.is_file():
        raise UserError(f"no index.json in {location}: pack a dataset first with `shardtrain "
                        f"pack` (or adopt shards with `shardtrain index`)")
    return path.read_bytes()


@lru_cache(maxsize=4)  # read once per process: checkpoints ask for the hash again and again
def remote_index_bytes(url: str) -> bytes:
    try:
        return read_url(join(url, "index.json"), Retry())
    except NotFound:
        raise UserError(f"no index.json at {url}: serve a folder written by `shardtrain pack` "
                        f"or `shardtrain index`") from None


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
    """Load and validate DIR/index.json, DIR a folder or URL (UserError/DataError, one line)."""
    location = str(dir)
    remote = is_url(location)
    root = Path(location.rstrip("/").split("/")[-1]) if remote else local_path(location)
    path = f"{location.rstrip('/')}/index.json"
    data = index_bytes(location)
    try:
        raw = json.loads(data)
        if raw.get("format_version") != 1:
            raise DataError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
        classes, size = list(raw["classes"]), raw["image_size"]
        splits = {k: _check_split(root, k, v, len(classes)) for k, v in raw["splits"].items()}
        if "train" not in splits or raw["channels"] not in (1, 3):
            raise DataError(f"{path}: no train split or bad channels")
        return Index(root, raw["name"], classes, raw["channels"], tuple(size) if size else None,
                     list(raw["mean"]), list(raw["std"]), splits, raw, location,
                     data)  # fmt: skip
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
    shard_paths: list[Path]  # local shards; for shards behind URLs, their node-cache entries
    damaged: list[str] = field(default_factory=list)  # shards whose size differs from index.json
    remote: RemoteShards | None = None  # set when the shards live behind URLs

    @property
    def downloads(self):
        """cache.Downloads of this process (None for local shards)."""
        return self.remote.cache.downloads if self.remote else None

    def shard_name(self, shard: int) -> str:
        return self.remote.refs[shard].name if self.remote else self.shard_paths[shard].name

    def __len__(self) -> int:
        return len(self.label)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_sidecar(root: Path, s: dict, first_id: int, n_classes: int, damaged: list,
                 consecutive_keys: bool = True, shard_dir: Path | None = None,
                 check_shard: bool = True) -> dict:
    """Read and check a local sidecar; note a local shard whose size differs from the index."""
    side_path, shard_path = root / s["samples_file"], (shard_dir or root) / s["file"]
    for p in (shard_path, side_path) if check_shard else (side_path,):
        if not p.is_file():
            raise DataError(f"{p.name}: missing from {p.parent}")
    if check_shard and shard_path.stat().st_size != s["bytes"]:
        damaged.append(f"{s['file']}: size {shard_path.stat().st_size} != {s['bytes']} bytes "
                       f"in index.json (truncated or replaced?)")  # fmt: skip
    data = side_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != s["samples_sha256"]:
        raise DataError(f"{s['samples_file']}: sha256 mismatch with index.json")
    return parse_sidecar(data, s, first_id, n_classes, consecutive_keys)


def parse_sidecar(data: bytes, s: dict, first_id: int, n_classes: int,
                  consecutive_keys: bool) -> dict:
    side = json.loads(data)
    n = s["num_samples"]
    if any(len(side[k]) != n for k in ("keys", "labels", "exts", "offsets", "sizes")):
        raise DataError(f"{s['samples_file']}: expected {n} entries")
    if consecutive_keys and side["keys"] != [f"{first_id + i:08d}" for i in range(n)]:
        raise DataError(f"{s['samples_file']}: keys are not consecutive sample ids")
    if any(not 0 <= y < n_classes for y in side["labels"]):
        raise DataError(f"{s['samples_file']}: label out of range")
    return side


def read_sidecar(index: Index, s: dict, first_id: int, damaged: list,
                 cache: ShardCache) -> dict:
    """One shard's sidecar from the index's folder or URL (remote ones via the node cache)."""
    n_classes, consecutive = len(index.classes), not index.adopted
    if is_url(index.location):
        ref = ShardRef(join(index.location, s["samples_file"]), s["samples_file"],
                       s["samples_sha256"], 0)
        return parse_sidecar(cache.read_small(ref), s, first_id, n_classes, consecutive)
    local_shards = not is_url(index.shard_base)  # else: local sidecars, shards behind a URL
    return load_sidecar(index.root, s, first_id, n_classes, damaged, consecutive,
                        Path(index.shard_base) if local_shards else None, local_shards)


def remote_shards(index: Index, shards: list[dict], cache: ShardCache) -> RemoteShards:
    refs = [ShardRef(join(index.shard_base, s["file"]), s["file"], s["sha256"], s["bytes"],
                     gz=s["file"].endswith((".gz", ".tgz"))) for s in shards]
    return RemoteShards(refs, cache)


def sample_table(index: Index, split: str, check_checksums: bool = False,
                 cache: ShardCache | None = None) -> SampleTable:
    """Sample arrays of one split; DataError naming the first missing/mismatched file.

    Without check_checksums a local shard whose size differs from index.json is not an error:
    it is listed in `damaged`, and the loader reads it up to the damage, skipping what it cannot
    read. Shards behind URLs are checked (size, sha256) as they are downloaded, so
    check_checksums does not fetch them all up front; `cache` is where they go (default: the
    node's temp dir, no size limit).
    """
    info = index.split(split)
    cache = cache or ShardCache(default_cache_dir(), 0, Retry())
    remote = remote_shards(index, info.shards, cache) if is_url(index.shard_base) else None
    cols: dict[str, list] = {"shard": [], "offset": [], "size": [], "ext": [], "label": []}
    damaged: list[str] = []
    for i, s in enumerate(info.shards):
        side = read_sidecar(index, s, len(cols["label"]), damaged, cache)
        if damaged and check_checksums:
            raise DataError(damaged[0])
        if check_checksums and not remote and \
                sha256_file(Path(index.shard_base) / s["file"]) != s["sha256"]:
            raise DataError(f"{s['file']}: sha256 mismatch with index.json (corrupt shard; "
                            f"data.verify_checksums=false reads what is readable)")
        cols["shard"] += [i] * s["num_samples"]
        for col, key in (("offset", "offsets"), ("size", "sizes"), ("ext", "exts"),
                         ("label", "labels")):
            cols[col] += side[key]
    paths = [cache.entry(r) for r in remote.refs] if remote else \
        [Path(index.shard_base) / s["file"] for s in info.shards]
    return SampleTable(
        np.asarray(cols["shard"], np.int32), np.asarray(cols["offset"], np.int64),
        np.asarray(cols["size"], np.int64), cols["ext"], np.asarray(cols["label"], np.int64),
        paths, damaged, remote,
    )  # fmt: skip
