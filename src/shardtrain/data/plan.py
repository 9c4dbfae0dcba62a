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

`partition="node"` (data.partition=node): each node reads only its share of the shards per epoch
(MosaicML streaming's canonical nodes). The permuted shards' samples, in shard order, are cut
into C equal contiguous ranges (C = canonical nodes, fixed for the run: at most C-1 shards
straddle two ranges); each range is block-shuffled on its own; optimizer step s takes samples
[s*G/C, (s+1)*G/C) of every range. Physical node p (of P, P dividing C or C dividing P) serves
ranges p, p+P, ... (or a 1/(P/C) slice of range p // (P/C)), its ranks split them as above. The
samples of every step depend on (seed, epoch, C), not on P. Egress with a cache smaller than the
dataset: ~1x the dataset per epoch for all nodes together, against P x for the global plan.
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
    partition: str = "global"  # global | node
    canonical_nodes: int = 1  # C, with partition="node"
    nodes: int = 1  # physical nodes P; rank r runs on node r // (world_size // nodes)

    @property
    def batch_per_device(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    @property
    def node(self) -> int:
        return self.rank // (self.world_size // self.nodes)

    @property
    def steps_per_epoch(self) -> int:
        if self.partition == "node":
            c = self.canonical_nodes
            return (sum(self.shard_sizes) // c) // (self.global_batch // c)
        return sum(self.shard_sizes) // self.global_batch

    @property
    def shards_at_once(self) -> int:
        """Shards a rank's batches draw from at any moment: the block-shuffle window (one per
        canonical node its node serves); the cache must hold them, prefetching comes on top."""
        streams = max(self.canonical_nodes // self.nodes, 1) if self.partition == "node" else 1
        n = len(self.shard_sizes)
        return n if self.window <= 0 else min(self.window * streams, n)

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
        if self.partition == "node":
            local = self.world_size // self.nodes
            start = (micro * local + self.rank % local) * b
            return epoch, self.node_step(epoch, step)[start:start + b]
        start = step * self.global_batch + (micro * self.world_size + self.rank) * b
        return epoch, self.order(epoch)[start:start + b]

    def node_step(self, epoch: int, step: int) -> np.ndarray:
        """The samples this rank's node reads at optimizer `step` (partition="node")."""
        c, p = self.canonical_nodes, self.node
        ranges = cached_node_orders(self.shard_sizes, self.seed, epoch, self.window, c)
        g = self.global_batch // c
        if self.nodes <= c:  # node p serves canonical nodes p, p+P, ...
            return np.concatenate([ranges[k, step * g:(step + 1) * g]
                                   for k in range(p, c, self.nodes)])
        share = g // (self.nodes // c)  # canonical node p // (P/C), split among P/C nodes
        j = p % (self.nodes // c)
        return ranges[p // (self.nodes // c), step * g + j * share:step * g + (j + 1) * share]


@lru_cache(maxsize=2)  # the current epoch (and the next while prefetching): memory stays flat
def cached_order(shard_sizes: tuple[int, ...], seed: int, epoch: int, window: int) -> np.ndarray:
    return epoch_order(shard_sizes, seed, epoch, window)


def node_orders(shard_sizes: tuple[int, ...], seed: int, epoch: int, window: int,
                canonical_nodes: int) -> np.ndarray:
    """(C, S) sample ids: canonical node c's samples of one epoch in order (see module doc)."""
    rng = random.Random(f"shardtrain-order-{seed}-{epoch}")  # the global plan's permutation
    shard_ids = list(range(len(shard_sizes)))
    rng.shuffle(shard_ids)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    seq = np.concatenate([np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shard_ids])
    edges = np.cumsum([shard_sizes[s] for s in shard_ids])  # shard boundaries in seq
    per = len(seq) // canonical_nodes
    out = np.empty((canonical_nodes, per), dtype=np.int64)
    for c in range(canonical_nodes):
        lo, hi = c * per, (c + 1) * per
        runs = [lo] + [int(e) for e in edges if lo < e < hi] + [hi]  # one run per shard
        w = window if window > 0 else len(runs)
        np_rng = np.random.default_rng([seed, epoch, c, 0x5EED])
        for k in range(0, len(runs) - 1, w):
            block = seq[runs[k]:runs[min(k + w, len(runs) - 1)]].copy()
            np_rng.shuffle(block)
            out[c, runs[k] - lo:runs[k] - lo + len(block)] = block
    return out


@lru_cache(maxsize=2)
def cached_node_orders(shard_sizes: tuple[int, ...], seed: int, epoch: int, window: int,
                       canonical_nodes: int) -> np.ndarray:
    return node_orders(shard_sizes, seed, epoch, window, canonical_nodes)


def check_node_layout(global_batch: int, nodes: int, canonical_nodes: int,
                      num_samples: int) -> None:
    """Raise ValueError when data.partition=node cannot split the data evenly."""
    c, p = canonical_nodes, nodes
    if c < 1 or (p % c and c % p):
        raise ValueError(f"data.canonical_nodes={c} and the {p} node(s) of this launch must "
                         f"divide one another")
    share = c if p <= c else p
    if global_batch % share:
        raise ValueError(f"data.partition=node: data.batch_size={global_batch} must be "
                         f"divisible by max(canonical nodes, nodes) = {share}")
    if num_samples // c < global_batch // c:
        raise ValueError(f"data.partition=node: {num_samples} samples over {c} canonical nodes "
                         f"is less than one step")


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
