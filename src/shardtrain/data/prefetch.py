"""Fill the node cache ahead of the epoch plan, and count what was downloaded per epoch.

The train DataLoader's sampler (PlanSampler) runs in the rank's main process and hands batch
indices to the workers in plan order. For shards behind URLs it also runs a Prefetcher thread:
the plan says which shards the batches after the last one handed out will read, so the thread
keeps the current window's shards and the next `prefetch_shards` after them downloaded (first
use first), then evicts what the cache limit requires, sparing the shards of batches in flight
and of that horizon. In a
warm steady state the workers never wait on the network; when they do (a miss), they fetch the
shard themselves and the bytes come back with the batch.

cache.Downloads counts bytes per plan epoch (-1: evaluation) in the main process: the
prefetcher's directly, the workers' from each batch's "downloaded" entry (CountingLoader).
"""

from __future__ import annotations

import threading

import numpy as np

from shardtrain.data.cache import Downloads
from shardtrain.errors import DataError

def first_use_order(shards: np.ndarray) -> list[int]:
    """Distinct shard ids in the order they are first read."""
    _, first = np.unique(shards, return_index=True)
    return [int(s) for s in shards[np.sort(first)]]


class Prefetcher(threading.Thread):
    """Downloads the next shards of the plan ahead of the loader workers (a daemon thread)."""

    SCAN = 2048  # batches looked ahead at most to find `horizon` distinct shards

    def __init__(self, batch_ids, shard_of, end: int, remote, horizon: int, in_flight: int,
                 downloads: Downloads):
        super().__init__(daemon=True, name="shardtrain-prefetch")
        self.batch_ids, self.shard_of, self.end = batch_ids, shard_of, end
        self.remote, self.horizon, self.in_flight = remote, horizon, in_flight
        self.downloads = downloads
        self.position, self.error = 0, None
        self.changed, self.stopped = threading.Condition(), False

    def advance(self, position: int) -> None:
        with self.changed:
            self.position = position
            self.changed.notify()

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify()

    def upcoming(self, position: int) -> list[tuple[int, int]]:
        """(shard, epoch) of the next `horizon` distinct shards from `position` on."""
        wanted: dict[int, int] = {}
        for i in range(position, min(self.end, position + self.SCAN)):
            epoch, ids = self.batch_ids(i)
            for shard in first_use_order(self.shard_of[ids]):
                wanted.setdefault(shard, epoch)
            if len(wanted) >= self.horizon:  # whole batches: all they read is wanted
                break
        return list(wanted.items())

    def in_use(self, position: int) -> set[int]:
        """Shards of the batches handed out but maybe not read yet."""
        shards = set()
        for i in range(max(0, position - self.in_flight), min(position + 1, self.end)):
            shards.update(np.unique(self.shard_of[self.batch_ids(i)[1]]).tolist())
        return shards

    def run(self) -> None:
        done = -1
        while True:
            with self.changed:
                while self.position == done and not self.stopped:
                    self.changed.wait()
                if self.stopped:
                    return
                position = done = self.position
            try:
                upcoming = self.upcoming(position)
                for shard, epoch in upcoming:
                    if self.stopped:
                        return
                    self.downloads.add(epoch, self.remote.fetch(shard)[1])
                keep = self.in_use(position) | {shard for shard, _ in upcoming}
                self.remote.cache.evict({self.remote.entry(s) for s in keep})
            except Exception as e:  # noqa: BLE001 - re-raised in the main thread by check()
                self.error = e
                return

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class PlanSampler:
    """Batch indices start..end-1 in order; drives a Prefetcher when the shards are remote."""

    def __init__(self, start: int, end: int, batch_ids, table, in_flight: int,
                 window_shards: int):
        self.start, self.end, self.batch_ids, self.table = start, end, batch_ids, table
        self.in_flight, self.window_shards = in_flight, window_shards

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        if self.table.remote is None or self.start >= self.end:
            yield from range(self.start, self.end)
            return
        remote = self.table.remote
        horizon = self.window_shards + remote.prefetch_shards
        prefetcher = Prefetcher(self.batch_ids, self.table.shard, self.end, remote, horizon,
                                self.in_flight, remote.cache.downloads)
        prefetcher.advance(self.start)
        prefetcher.start()
        try:
            for i in range(self.start, self.end):
                prefetcher.check()  # a shard that could not be fetched stops training here
                prefetcher.advance(i)
                yield i
        finally:
            prefetcher.stop()


class CountingLoader:
    """Iterates a DataLoader, moving each batch's worker-side download count into `downloads`
    and raising, in the main process, a fetch error a worker met (one line, exit 1)."""

    def __init__(self, loader, downloads: Downloads | None):
        self.loader, self.downloads = loader, downloads

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches, error = iter(self.loader), None
        try:
            for batch in batches:
                if "fetch_error" in batch:
                    raise DataError(batch["fetch_error"])
                epoch, downloaded = batch.pop("epoch"), batch.pop("downloaded")
                if self.downloads is not None:
                    self.downloads.add(epoch, downloaded)
                yield batch
        except DataError as e:  # from a worker's batch or from the sampler's prefetcher
            error = str(e)
        if error is not None:
            # stop the workers now (what the DataLoader iterator does at its end or in __del__,
            # which a pending traceback would postpone past the exit): they ignore SIGTERM
            # (preemption), so the interpreter's exit would wait for them forever
            getattr(batches, "_shutdown_workers", lambda: None)()
            raise DataError(error)
