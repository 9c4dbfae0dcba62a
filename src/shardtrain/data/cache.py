"""Node-local shard cache for shards behind URLs: one verified copy per node, filled ahead of use.

    cache = ShardCache(Path("/tmp/shardtrain-cache"), limit_bytes=50e9, retry=Retry())
    path, downloaded = cache.ensure(ShardRef(url, "train-000003.tar", sha256, nbytes, gz=False))

- Entries are content-addressed: `ROOT/<sha256[:2]>/<sha256>.tar` (a `.tar.gz` shard is stored
  inflated, so loader workers read it with one positioned read per sample and never hold an
  inflated shard in memory). Two datasets sharing a shard share its entry.
- One download per shard per node: the downloader holds an `fcntl` lock on `<entry>.lock`,
  streams into `<entry>.tmp-<pid>-<thread>`, checks size and sha256 against the index, fsyncs
  and renames into place; ranks and loader workers that want the same shard wait on the lock,
  then read the finished file. A crash leaves a tmp file, never a half entry.
- Eviction: least recently used (mtime, touched on every use) beyond `limit_bytes`, never an
  entry the caller protects (the current window and the prefetch list) nor one being written.
  A cache that holds the whole dataset never evicts: epoch 2+ downloads nothing.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from shardtrain.data.remote import Retry, download, read_url
from shardtrain.errors import DataError


def default_cache_dir() -> Path:
    """$SHARDTRAIN_CACHE, else a folder in the node's temp dir (node-local on clusters)."""
    env = os.environ.get("SHARDTRAIN_CACHE")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"shardtrain-cache-{os.getuid()}"


class Downloads:
    """Bytes downloaded by this process, per plan epoch; -1 = evaluation (thread-safe)."""

    def __init__(self):
        self.by_epoch: dict[int, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, epoch: int, nbytes: int) -> None:
        if nbytes:
            with self.lock:
                self.by_epoch[int(epoch)] += int(nbytes)

    def take(self, epoch: int) -> int:
        with self.lock:
            return self.by_epoch.pop(int(epoch), 0)


@dataclass(frozen=True)
class ShardRef:
    """Where one shard (or sidecar) lives and what its bytes must be."""

    url: str
    name: str  # file name, for messages
    sha256: str
    nbytes: int
    gz: bool = False  # stored inflated in the cache


@dataclass
class RemoteShards:
    """The shards of one split behind URLs, and the cache they are read through (picklable)."""

    refs: list[ShardRef]
    cache: ShardCache
    prefetch_shards: int = 8  # distinct shards kept downloaded ahead of the loader

    def fetch(self, shard: int) -> tuple[Path, int]:
        return self.cache.ensure(self.refs[shard])

    def entry(self, shard: int) -> Path:
        return self.cache.entry(self.refs[shard])


class ShardCache:
    """Content-addressed, locked, verified local copies of remote files (picklable)."""

    def __init__(self, root: Path, limit_bytes: int, retry: Retry):
        self.root, self.limit_bytes, self.retry = Path(root), int(limit_bytes), retry
        self.downloads = Downloads()  # this process's count; workers report theirs per batch

    def __getstate__(self) -> dict:
        return {"root": self.root, "limit_bytes": self.limit_bytes, "retry": self.retry}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def entry(self, ref: ShardRef, suffix: str = ".tar") -> Path:
        return self.root / ref.sha256[:2] / f"{ref.sha256}{suffix}"

    def ensure(self, ref: ShardRef) -> tuple[Path, int]:
        """(local path of the verified shard, bytes downloaded for it by this call)."""
        path = self.entry(ref)
        if touch(path):
            return path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path):
            if touch(path):  # another rank or worker of this node finished it meanwhile
                return path, 0
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            try:
                n = download(ref.url, tmp, self.retry, sha256=ref.sha256, size=ref.nbytes,
                             inflate=ref.gz)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return path, n

    def read_small(self, ref: ShardRef) -> bytes:
        """A sidecar's bytes, cached like a shard (one request per node, verified)."""
        path = self.entry(ref, ".json")
        if not touch(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with locked(path):
                if not path.exists():
                    data = read_url(ref.url, self.retry)
                    check_sha256(data, ref)
                    write_atomic(path, data)
        data = path.read_bytes()
        check_sha256(data, ref)
        return data

    def evict(self, protected: set[Path]) -> list[Path]:
        """Remove least recently used entries until the cache fits its limit; returns them."""
        if self.limit_bytes <= 0 or not self.root.is_dir():
            return []
        entries = []
        for p in self.root.glob("*/*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.limit_bytes:
                break
            if path in protected or not remove_unless_locked(path):
                continue
            total -= size
            removed.append(path)
        return removed


def check_sha256(data: bytes, ref: ShardRef) -> None:
    import hashlib

    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DataError(f"{ref.name} ({ref.url}): sha256 mismatch with index.json")


def touch(path: Path) -> bool:
    """Mark an entry as just used (LRU order); False when it is not there."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False


class locked:
    """Exclusive fcntl lock on `<path>.lock`: one writer per entry across processes/threads."""

    def __init__(self, path: Path, blocking: bool = True):
        self.lock_path, self.blocking = path.with_name(path.name + ".lock"), blocking

    def __enter__(self):
        self.file = open(self.lock_path, "a")
        flags = fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.file.fileno(), flags)
        except BlockingIOError:
            self.file.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()  # the lock file stays: unlinking it would race with a new waiter


def remove_unless_locked(path: Path) -> bool:
    try:
        with locked(path, blocking=False):
            path.unlink(missing_ok=True)
        return True
    except BlockingIOError:  # being written right now: not ours to remove
        return False


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
