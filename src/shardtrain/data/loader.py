"""make_train_loader() / make_eval_loader(): plan + shards -> uint8 batches for this rank.

A torch DataLoader over a map-style dataset whose item i is this rank's i-th micro-batch. With
`batch_size=None` the DataLoader hands item i to worker i mod W and yields items in order, so
workers take whole batches round-robin and the main process sees them in plan order. Resuming is
starting the index range later: consumed samples are never read or decoded.

Workers read samples by byte offset (index.ShardReader), decode them and run the per-sample part
of the augmentation with a generator seeded by (seed, epoch, sample id), so the result never
depends on which worker ran. The cheap per-batch part (pad-crop, flips, colour jitter,
normalisation) runs on the training device in batch.py (on the GPU when there is one); workers
only draw its parameters and send uint8 images (no float conversion in the workers).

Corrupt samples are dropped from their batch and reported in `batch["skipped"]`, never silently.

Shards behind URLs (table.remote) are read from the node-local cache: the sampler keeps the next
shards of the plan downloaded in the background (data/prefetch.py), a worker fetches a shard
itself only when it gets there first, and a shard that cannot be fetched stops the run with a
one-line DataError (exit 1) in the main process.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from multiprocessing import forkserver

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shardtrain.config import AugmentConfig
from shardtrain.data import transforms
from shardtrain.data.codec import decode_image
from shardtrain.data.index import SampleTable, ShardReader
from shardtrain.data.plan import TrainPlan, eval_ids
from shardtrain.data.prefetch import CountingLoader, PlanSampler
from shardtrain.errors import DataError

EVAL = -1  # Downloads key of evaluation reads


@dataclass(frozen=True)
class SampleOptions:
    """What the workers do to each sample (a picklable slice of the config)."""

    channels: int
    image_size: int  # output side in px
    train: bool
    seed: int = 0
    pad_crop: int = 0
    hflip: bool = False
    vflip: bool = False
    resized_crop: float = 0.0
    rotation: float = 0.0
    color_jitter: float = 0.0
    policy: str = "none"  # none | randaugment | trivialaugment
    random_erasing: float = 0.0  # probability per sample
    progressive_sizes: tuple[int, ...] = ()  # training side of the first epochs (batch.py)

    def train_size(self, epoch: int) -> int:
        """The side the training device resizes this epoch's batches to (progressive resizing)."""
        sizes = self.progressive_sizes
        return sizes[epoch] if self.train and epoch < len(sizes) else self.image_size


class Batches(Dataset):
    """Item i = the i-th batch of sample ids from `batch_ids(i)`, decoded (and augmented)."""

    def __init__(self, table: SampleTable, options: SampleOptions, batch_ids, length: int):
        self.table, self.options, self.batch_ids, self.length = table, options, batch_ids, length
        self.reader = None  # opened lazily inside each worker process

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.reader is None:
            self.reader = ShardReader(self.table.shard_paths, remote=self.table.remote)
        epoch, ids = self.batch_ids(i)
        epoch = epoch if self.options.train else EVAL
        downloaded = 0
        if self.table.remote is not None:
            try:  # fetch failures are not corrupt samples: the main process stops the run
                downloaded = self.reader.open_shards(np.unique(self.table.shard[ids]).tolist())
            except DataError as e:
                return {"fetch_error": str(e)}
        images, labels, params, kept, skipped = [], [], [], [], []
        for sample_id in ids.tolist():
            try:
                image = self.load(sample_id)
            except (ValueError, OSError, DataError) as e:  # corrupt sample: drop and report it
                skipped.append(f"{self.table.shard_name(self.table.shard[sample_id])}:"
                               f"{sample_id:08d}: {e}")
                continue
            image, param = self.augment(image, epoch, sample_id)
            images.append(image)
            params.append(param)
            labels.append(int(self.table.label[sample_id]))
            kept.append(sample_id)
        return {**collate(images, labels, params, kept, skipped, self.options),
                "epoch": epoch, "downloaded": downloaded,
                "size": self.options.train_size(epoch)}  # progressive resizing (batch.py)

    def load(self, sample_id: int) -> torch.Tensor:
        t = self.table
        data = self.reader.read(int(t.shard[sample_id]), int(t.offset[sample_id]),
                                int(t.size[sample_id]))
        return decode_image(data, str(t.ext[sample_id]), self.options.channels)

    def augment(self, image: torch.Tensor, epoch: int, sample_id: int):
        o = self.options
        if not o.train:
            return transforms.resize_sample(image, o.image_size), (0, 0, False, False, None)
        gen = transforms.sample_generator(o.seed, epoch, sample_id)
        image = transforms.augment_sample(
            image, gen, out_size=o.image_size, resized_crop=o.resized_crop, rotation=o.rotation)
        jitter = transforms.jitter_factors(gen, o.color_jitter) if o.color_jitter > 0 else None
        dy, dx, hflip, vflip = transforms.sample_crop_flip(gen, o.pad_crop, o.hflip, o.vflip)
        if not o.pad_crop and (hflip or vflip):  # no crop to gather on the device: flip here,
            image = image.flip([d for d, f in ((-1, hflip), (-2, vflip)) if f])  # ~free per image
            hflip = vflip = False
        params = (dy, dx, hflip, vflip, jitter)
        # drawn after the crop/flip params: enabling these leaves the older stream unchanged
        image = transforms.apply_policy(image, o.policy, gen)
        return transforms.random_erase(image, gen, o.random_erasing), params


def collate(images, labels, params, kept, skipped, options: SampleOptions) -> dict:
    if images:
        x = torch.stack(images)  # (B, C, H, W) uint8
    else:
        x = torch.zeros(0, options.channels, options.image_size, options.image_size,
                        dtype=torch.uint8)
    return {
        "images": x,
        "labels": torch.tensor(labels, dtype=torch.long),
        "offsets": torch.tensor([p[:2] for p in params], dtype=torch.long).reshape(-1, 2),
        "hflips": torch.tensor([p[2] for p in params], dtype=torch.bool),
        "vflips": torch.tensor([p[3] for p in params], dtype=torch.bool),
        "ids": torch.tensor(kept, dtype=torch.long),
        "skipped": skipped,
    } | ({"jitter": torch.tensor([p[4] for p in params], dtype=torch.float32).reshape(-1, 3)}
         if options.train and options.color_jitter > 0 else {})


def make_train_loader(table: SampleTable, plan: TrainPlan, options: SampleOptions, *,
                      start_micro: int, end_micro: int, workers: int, prefetch: int,
                      pin_memory: bool) -> DataLoader:
    """This rank's micro-batches start_micro..end_micro-1 (counted from the start of training)."""
    dataset = Batches(table, options, plan.micro_batch, length=end_micro)
    sampler = PlanSampler(start_micro, end_micro, plan.micro_batch, table,
                          in_flight=max(workers, 1) * (prefetch if workers else 1),
                          window_shards=plan.shards_at_once)
    loader = DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=prefetch if workers else None,
        multiprocessing_context=worker_context(workers), worker_init_fn=ignore_job_signals,
        # its own generator: drawing worker seeds must not consume the global RNG (dropout),
        # or a resumed run would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(options.seed))
    return CountingLoader(loader, table.downloads)


def make_eval_loader(table: SampleTable, options: SampleOptions, *, world_size: int, rank: int,
                     batch_size: int, workers: int, pin_memory: bool,
                     persistent: bool = False) -> DataLoader:
    """This rank's share of a split, every sample once across ranks (plan.eval_ids)."""
    chunks = EvalChunks(eval_ids(len(table.label), world_size, rank), batch_size)
    dataset = Batches(table, options, chunks, length=len(chunks))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=2 if workers else None,
                        multiprocessing_context=worker_context(workers),
                        worker_init_fn=ignore_job_signals,
                        persistent_workers=persistent and workers > 0,
                        generator=torch.Generator().manual_seed(0))
    return CountingLoader(loader, table.downloads)


JOB_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # preemption: the trainer's, not the workers'


def worker_context(workers: int) -> str | None:
    """forkserver, not fork: forking a process that already runs gloo/NCCL and OpenMP threads
    can deadlock the child (seen here at an epoch-end eval loader), a clean server cannot.

    SLURM signals every process of a job step; the server is started with the preemption
    signals ignored (workers inherit that), so only the trainer reacts: it finishes its step and
    checkpoints while the workers keep serving batches.
    """
    if workers == 0:
        return None
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in JOB_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return "forkserver"


def ignore_job_signals(worker_id: int) -> None:
    """In each worker, after torch installed its own handlers (torch sets one for SIGTERM)."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class EvalChunks:
    """Callable batch_ids for eval: chunk i of this rank's ids (picklable, unlike a lambda)."""

    def __init__(self, ids: np.ndarray, batch_size: int):
        self.ids, self.batch_size = ids, batch_size

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __call__(self, i: int) -> tuple[int, np.ndarray]:
        return 0, self.ids[i * self.batch_size:(i + 1) * self.batch_size]


def train_options(augment: AugmentConfig, seed: int, channels: int,
                  image_size: int) -> SampleOptions:
    """The workers' part of a recipe's training augmentation (pad-crop/flip: parameters only)."""
    a = augment
    return SampleOptions(
        channels=channels, image_size=image_size, train=True, seed=seed,
        pad_crop=a.pad_crop, hflip=a.hflip, vflip=a.vflip, resized_crop=a.resized_crop,
        rotation=a.rotation, color_jitter=a.color_jitter, policy=a.policy,
        random_erasing=a.random_erasing, progressive_sizes=tuple(a.progressive_sizes))


def eval_options(channels: int, image_size: int) -> SampleOptions:
    """Decode and resize only: what evaluation, `show` and predictions read."""
    return SampleOptions(channels=channels, image_size=image_size, train=False)

