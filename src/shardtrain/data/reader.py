"""ShardReader: the bytes of one sample member, by (shard, offset, size), in any process.

    reader = ShardReader(table.shard_paths, remote=table.remote)
    downloaded = reader.open_shards({0, 3})          # remote: fetched into the node cache first
    data = reader.read(3, offset, size)              # one positioned read (os.pread)

- A plain local `.tar` is read in place.
- A shard behind a URL is read from its verified copy in the node-local cache (data/cache.py),
  fetched on first use if the prefetcher has not brought it yet; `.tar.gz` shards are cached
  inflated.
- A local `.tar.gz` is inflated, streaming, into an unnamed temporary file of this process (at
  most `cache_shards` at a time): memory stays flat whatever the shard size. A truncated one
  yields what precedes the damage.
Files are opened lazily and never shared across processes (a forked worker starts afresh); at
most `max_open` stay open, least recently used closed first (cached shards: only the current
batch's, see open_shards).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections import OrderedDict
from pathlib import Path

from shardtrain.errors import DataError

CHUNK = 1 << 20


def inflate_readable(src: Path, out) -> None:
    """gunzip src into the file object `out`, stopping quietly at the first damaged byte."""
    gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            try:
                out.write(gunzip.decompress(chunk))
            except zlib.error:
                break
    out.flush()


class ShardReader:
    """Reads members by (shard, offset, size) from local, cached-remote or gzipped shards."""

    def __init__(self, paths: list[Path], cache_shards: int = 4, remote=None,
                 max_open: int = 32):
        self.paths, self.cache_shards = [Path(p) for p in paths], cache_shards
        self.remote, self.max_open = remote, max_open  # remote: cache.RemoteShards or None
        self._pid, self._files, self._gz = None, OrderedDict(), set()
        self.downloaded = 0  # bytes this reader fetched from remote storage since last taken

    def __getstate__(self) -> dict:  # handles never cross a process boundary
        return {"paths": self.paths, "cache_shards": self.cache_shards, "remote": self.remote,
                "max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _reset_if_forked(self) -> None:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share file offsets
            self._pid, self._files, self._gz = os.getpid(), OrderedDict(), set()

    def open_shards(self, shards) -> int:
        """Make these shards readable now (fetching remote ones); bytes downloaded doing so.

        Cached shards of earlier batches are closed first: an open file would keep an evicted
        entry's disk space (and bytes) alive, so the cache limit and its LRU would not bite."""
        self._reset_if_forked()
        keep = {int(s) for s in shards}
        if self.remote is not None:
            for shard in [s for s in self._files if s not in keep]:
                self._files.pop(shard).close()
        before = self.downloaded
        for shard in keep:
            self._file(shard, protect=keep)
        return self.downloaded - before

    def take_downloaded(self) -> int:
        n, self.downloaded = self.downloaded, 0
        return n

    def _file(self, shard: int, protect=()):
        f = self._files.get(shard)
        if f is not None:
            self._files.move_to_end(shard)
            return f
        self._close_least_recent(protect)
        if self.remote is not None:
            f = self._open_cached(shard)
        elif self.paths[shard].name.endswith((".gz", ".tgz")):
            f = tempfile.TemporaryFile(prefix="shardtrain-inflated-")  # unlinked: freed on close
            inflate_readable(self.paths[shard], f)
            self._gz.add(shard)
        else:  # unbuffered + pread: one syscall, no 8 KiB buffer refill per sample
            f = open(self.paths[shard], "rb", buffering=0)
        self._files[shard] = f
        return f

    def _open_cached(self, shard: int):
        for _ in range(3):  # an entry evicted between ensure() and open(): fetch it again
            path, n = self.remote.fetch(shard)
            self.downloaded += n
            try:
                return open(path, "rb", buffering=0)  # an open file survives a later eviction
            except FileNotFoundError:
                continue
        raise DataError(f"{self.remote.refs[shard].name}: evicted from the cache as soon as "
                        f"fetched (raise data.cache_limit)")

    def _close_least_recent(self, protect) -> None:
        protect = {int(s) for s in protect}
        for shard in list(self._files):
            if len(self._files) < self.max_open and len(self._gz) < self.cache_shards:
                break
            if shard not in protect:
                self._files.pop(shard).close()
                self._gz.discard(shard)

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """The `size` bytes at `offset` of the shard's uncompressed tar stream."""
        self._reset_if_forked()
        data = os.pread(self._file(int(shard)).fileno(), int(size), int(offset))
        if len(data) != size:
            raise DataError(f"{self.name(shard)}: short read at offset {offset} "
                            f"(truncated shard?)")
        return data

    def name(self, shard: int) -> str:
        return self.remote.refs[shard].name if self.remote is not None else self.paths[shard].name

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self._gz = OrderedDict(), set()
