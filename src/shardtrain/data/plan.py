"""The epoch plan: which samples, in which order, for which rank. Pure arithmetic, no I/O.

Every rank computes the same plan from (seed, epoch, shard sizes) with no communication:

1. shards are permuted with a Random(seed, epoch);
2. the samples of each window of `window` consecutive shards (in that order) are shuffled together
   (a block shuffle: reads stay within `window` shards at a time; window 0 = a full shuffle);
3. the tail is dropped so the epoch holds exactly `steps_per_epoch * global_batch` samples;
4. optimizer step s uses the global batch order[s*G:(s+1)*G]; inside it, micro-batch m of rank r
   is the slice starting at (m*world + r)*b, with b = the per-device batch.

So every rank runs exactly the same number of steps, no sample repeats within an epoch, and the
set of samples of each optimizer step does not depend on the world size: resuming with another
world size keeps the sample schedule. The data position to checkpoint is the optimizer step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def epoch_order(shard_sizes: tuple[int, ...], seed: int, epoch: int, window: int) -> np.ndarray:
    """Sample ids (positions in the split) of one epoch in training order."""
    rng = random.Random(f"shardtrain-order-{seed}-{epoch}")
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    shard_ids = list(range(len(shard_sizes)))
    rng.shuffle(shard_ids)
    window = window if window > 0 else len(shard_ids)
    np_rng = np.random.default_rng(rng.getrandbits(63))
    blocks = []
    for w in range(0, len(shard_ids), window):
        ids = [np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shard_ids[w:w + window]]
        block = np.concatenate(ids)
        np_rng.shuffle(block)
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class TrainPlan:
    """Batch layout of every epoch for one rank."""

    shard_sizes: tuple[int, ...]
    global_batch: int  # samples per optimizer step, all ranks and micro-batches together
    world_size: int
    rank: int
    grad_accum: int
    seed: int
    window: int

    @property
    def batch_per_device(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.shard_sizes) // self.global_batch

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.grad_accum

    def order(self, epoch: int) -> np.ndarray:
        return cached_order(self.shard_sizes, self.seed, epoch, self.window)

    def micro_batch(self, micro_index: int) -> tuple[int, np.ndarray]:
        """(epoch, sample ids) of this rank's `micro_index`-th micro-batch since training began."""
        epoch, m = divmod(micro_index, self.micro_per_epoch)
        step, micro = divmod(m, self.grad_accum)
        b = self.batch_per_device
        start = step * self.global_batch + (micro * self.world_size + self.rank) * b
        return epoch, self.order(epoch)[start:start + b]


@lru_cache(maxsize=2)  # the current epoch (and the next while prefetching): memory stays flat
def cached_order(shard_sizes: tuple[int, ...], seed: int, epoch: int, window: int) -> np.ndarray:
    return epoch_order(shard_sizes, seed, epoch, window)


def eval_ids(num_samples: int, world_size: int, rank: int) -> np.ndarray:
    """Rank r evaluates samples r, r+world, ...: every sample exactly once across ranks."""
    return np.arange(rank, num_samples, world_size, dtype=np.int64)


def check_batch_layout(global_batch: int, world_size: int, grad_accum: int,
                       num_samples: int) -> None:
    """Raise ValueError when the global batch cannot be split evenly or exceeds the data."""
    per = world_size * grad_accum
    if global_batch % per:
        raise ValueError(
            f"data.batch_size={global_batch} is not divisible by processes x grad_accum = "
            f"{world_size} x {grad_accum}; use a multiple of {per}")
    if num_samples < global_batch:
        raise ValueError(
            f"the train split has {num_samples} samples, fewer than one global batch "
            f"(data.batch_size={global_batch})")
