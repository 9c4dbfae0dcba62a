"""The shard loader: worker-independent batches, resume without re-reading, exact eval split."""

from __future__ import annotations

import torch

from shardtrain.data import loader as loader_module
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import SampleOptions, make_eval_loader, make_train_loader
from shardtrain.data.plan import TrainPlan

OPTIONS = SampleOptions(channels=3, image_size=16, train=True, seed=7, pad_crop=2, hflip=True,
                        rotation=10.0, color_jitter=0.2)


def setup(shards):
    index = load_index(shards)
    table = sample_table(index, "train")
    sizes = tuple(s["num_samples"] for s in index.split("train").shards)
    return table, TrainPlan(sizes, 32, 2, 1, 1, seed=7, window=2)  # rank 1 of 2


def batches(table, plan, workers, start=0, end=None):
    end = end or plan.micro_per_epoch * 2
    loader = make_train_loader(table, plan, OPTIONS, start_micro=start, end_micro=end,
                               workers=workers, prefetch=2, pin_memory=False)
    return list(loader)


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
               for k in ("images", "labels", "offsets", "hflips", "ids"))


def test_batches_do_not_depend_on_the_number_of_workers(learnable_shards):
    table, plan = setup(learnable_shards)
    assert same(batches(table, plan, 0), batches(table, plan, 2))


def test_epochs_differ_and_labels_match_the_index(learnable_shards):
    table, plan = setup(learnable_shards)
    got = batches(table, plan, 0)
    per_epoch = plan.micro_per_epoch
    assert not torch.equal(got[0]["ids"], got[per_epoch]["ids"])
    for b in got:
        assert torch.equal(b["labels"], torch.as_tensor(table.label[b["ids"].numpy()]))
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (16, 3, 16, 16)


def test_resume_reads_nothing_before_its_start(learnable_shards, monkeypatch):
    table, plan = setup(learnable_shards)
    full = batches(table, plan, 0)
    decoded = []
    real = loader_module.decode_image
    monkeypatch.setattr(loader_module, "decode_image",
                        lambda data, ext, ch: decoded.append(1) or real(data, ext, ch))
    tail = batches(table, plan, 0, start=5)
    assert same(full[5:], tail)
    assert len(decoded) == sum(len(b["ids"]) for b in tail)  # consumed samples never decoded


def test_eval_loader_covers_each_sample_once(learnable_shards):
    table = sample_table(load_index(learnable_shards), "test")
    opts = SampleOptions(channels=3, image_size=16, train=False)
    ids = []
    for rank in range(3):
        for b in make_eval_loader(table, opts, world_size=3, rank=rank, batch_size=4, workers=0,
                                  pin_memory=False):
            ids += b["ids"].tolist()
    assert sorted(ids) == list(range(len(table)))


def test_progressive_sizes_resize_the_first_epochs_only(learnable_shards):
    from dataclasses import replace

    from shardtrain.data.batch import BatchOptions, prepare_batch

    table, plan = setup(learnable_shards)
    options = replace(OPTIONS, progressive_sizes=(8, 12))  # epoch 0 at 8 px, epoch 1 at 12 px
    per_epoch = plan.micro_per_epoch
    loader = make_train_loader(table, plan, options, start_micro=0, end_micro=per_epoch * 3,
                               workers=0, prefetch=2, pin_memory=False)
    opts = BatchOptions(torch.zeros(3), torch.ones(3), "unit", pad_crop=2)
    sides = [prepare_batch(b, torch.device("cpu"), opts, train=True)[0].shape[-2:]
             for b in loader]
    want = [(8, 8)] * per_epoch + [(12, 12)] * per_epoch + [(16, 16)] * per_epoch
    assert [tuple(s) for s in sides] == want
    eval_batch = next(iter(loader))  # the same batch read for evaluation keeps its full size
    assert prepare_batch(eval_batch, torch.device("cpu"), opts, train=False)[0].shape[-1] == 16


def test_without_pad_crop_the_workers_flip_and_the_device_does_not(learnable_shards):
    from dataclasses import replace

    from shardtrain.data.transforms import jitter_factors, sample_crop_flip, sample_generator

    table, plan = setup(learnable_shards)
    plain = replace(OPTIONS, pad_crop=0, hflip=False, rotation=0.0)
    flipping = replace(plain, hflip=True)
    a, b = (next(iter(make_train_loader(table, plan, o, start_micro=0, end_micro=1, workers=0,
                                        prefetch=2, pin_memory=False))) for o in (plain, flipping))
    assert not b["hflips"].any()  # nothing left for the device to flip
    def flip_drawn(sample_id):  # the worker's draws: jitter factors, then crop/flip
        gen = sample_generator(7, 0, sample_id)
        jitter_factors(gen, OPTIONS.color_jitter)
        return sample_crop_flip(gen, 0, True, False)[2]

    wanted = [flip_drawn(i) for i in b["ids"].tolist()]
    assert any(wanted) and not all(wanted)
    for img_a, img_b, flip in zip(a["images"], b["images"], wanted):
        assert torch.equal(img_b, img_a.flip(-1) if flip else img_a)
