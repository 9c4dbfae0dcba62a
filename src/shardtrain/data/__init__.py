"""From raw images to device-ready batches.

Packing (offline, `shardtrain pack`):
    sources.py, image_folder.py  read a raw dataset (IDX, CIFAR, torchvision, image folders)
    codec.py                     encode/decode one image (npy for small images, PNG, JPEG)
    pack.py, shard_writer.py     write tar shards + per-shard offset sidecars + index.json
    index.py, inspect.py         read index.json and sidecars; `shardtrain info` / `verify`
    adopt.py, adopt_read.py      `shardtrain index`: index shards written by any other tool

Shards anywhere (a folder, or http(s)://, s3://, gs:// through fsspec):
    remote.py     URLs, backends, retries with backoff, verified streaming downloads
    cache.py      the node-local shard cache: lock + atomic rename + sha256, LRU eviction
    prefetch.py   keeps the plan's next shards downloaded; bytes downloaded per epoch
    reader.py     ShardReader: one positioned read per sample (local, cached, or .tar.gz)

Reading (every training step):
    plan.py       the epoch plan: which samples every rank reads at every step (pure arithmetic)
    loader.py     loader workers read samples by byte offset, decode, and augment per sample
    batch.py      on the training device: batched pad-crop/flip, colour jitter, normalisation,
                  progressive resizing, channels_last
    mix.py        on the training device: mixup / cutmix of a whole micro-batch

Where each augmentation happens:
    in the loader workers, per sample, on uint8 images (transforms.py, seeded per sample):
        random-resized-crop, rotation, RandAugment/TrivialAugment, random erasing;
        the workers also draw each sample's pad-crop offset, flips and colour-jitter factors
        (parameters only);
    on the training device, per batch (batch.py, mix.py): the pad-crop, flips and colour jitter
        themselves (jitter last, after erasing), normalisation, progressive resizing,
        mixup/cutmix.
"""
