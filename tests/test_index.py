"""Reading packed shards: index validation, sample tables, offset reads, verify, info.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_index.py -q
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder
from helpers import run_shardtrain

from shardtrain.data.codec import decode_image
from shardtrain.data.index import ShardReader, index_hash, load_index, sample_table
from shardtrain.data.inspect import info_text, verify_shards
from shardtrain.data.pack import write_shards
from shardtrain.errors import DataError, UserError


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "copy"))


def test_load_index_errors(tmp_path, tiny_shards):
    with pytest.raises(UserError, match="no index.json .*shardtrain pack"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid index"):
        load_index(tmp_path)
    index = load_index(tiny_shards)
    with pytest.raises(UserError, match="available: train, val"):
        index.split("test")
    assert (
        index.channels == 3 and index.image_size == (16, 16) and len(index_hash(tiny_shards)) == 64
    )


def test_uneven_sample_table(uneven_shards):
    index = load_index(uneven_shards)
    assert [s["num_samples"] for s in index.split("train").shards] == [20, 20, 20, 20, 10]
    assert list(index.splits) == ["train", "test"]
    table = sample_table(index, "train", check_checksums=True)
    assert len(table) == 90 and table.shard.dtype == np.int32 and table.offset.dtype == np.int64
    assert np.bincount(table.shard).tolist() == [20, 20, 20, 20, 10]
    assert np.bincount(table.label).tolist() == index.split("train").class_counts == [30, 30, 30]
    test = sample_table(index, "test")
    assert len(test) == 33 and len(test.shard_paths) == 2
    reader = ShardReader(test.shard_paths)
    img = decode_image(reader.read(test.shard[32], test.offset[32], test.size[32]), test.ext[32], 3)
    assert img.shape == (3, 8, 8)


def test_missing_and_truncated_shard(tmp_path, uneven_shards):
    d = copy(uneven_shards, tmp_path)
    index = load_index(d)
    table = sample_table(index, "train")
    good = (d / "train-000002.tar").read_bytes()
    (d / "train-000002.tar").write_bytes(good[:3000])
    with pytest.raises(DataError, match="train-000002.tar: size"):
        sample_table(index, "train", check_checksums=True)
    assert "train-000002.tar: size" in sample_table(index, "train").damaged[0]
    with pytest.raises(DataError, match="train-000002.tar: short read"):
        ShardReader(table.shard_paths).read(2, int(table.offset[-11]), int(table.size[-11]))
    (d / "train-000002.tar").write_bytes(good)
    (d / "train-000003.samples.json").unlink()
    assert len(sample_table(index, "test")) == 33
    with pytest.raises(DataError, match="train-000003.samples.json: missing"):
        sample_table(index, "train")


def test_checksum_mismatch(tmp_path, uneven_shards):
    d = copy(uneven_shards, tmp_path)
    index = load_index(d)
    table = sample_table(index, "train")
    shard1 = d / "train-000001.tar"
    data = bytearray(shard1.read_bytes())
    off = int(table.offset[table.shard == 1][3]) + int(table.size[table.shard == 1][3]) - 1
    data[off] ^= 0xFF  # last pixel byte of a sample: decodes fine, only the hash can tell
    shard1.write_bytes(bytes(data))
    sample_table(index, "train")  # sizes still match
    with pytest.raises(DataError, match="train-000001.tar: sha256 mismatch"):
        sample_table(index, "train", check_checksums=True)
    with pytest.raises(DataError, match="train-000001.tar: sha256 mismatch"):
        verify_shards(d, progress=False)


def test_verify_ok_and_names_bad_sample(tmp_path, tiny_shards):
    assert "verified 64 samples in 5 shards" in verify_shards(tiny_shards, progress=False)
    d = copy(tiny_shards, tmp_path)
    index = load_index(d)
    table = sample_table(index, "train")
    i = int(np.flatnonzero(table.shard == 2)[5])  # corrupt the npy header of one sample
    shard = d / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[int(table.offset[i]) : int(table.offset[i]) + 6] = b"garbag"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"train-000002.tar: sample {i:08d}: corrupt npy"):
        verify_shards(d, progress=False)
    r = run_shardtrain(["verify", d], check=False)  # the command line: exit 1, one line
    errors = [x for x in r.stderr.splitlines() if "error" in x.lower()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and errors[0].startswith(
        f"shardtrain: error: train-000002.tar: sample {i:08d}: corrupt npy")
    (d / "train-000002.tar").write_bytes(bytes(data[:5000]))
    with pytest.raises(DataError, match="train-000002.tar: size"):
        verify_shards(d, progress=False)


def test_compressed_reader_lru_and_pickle(tmp_path):
    src = make_image_folder(tmp_path / "src", ["a", "b"], 15, size=8)
    write_shards(str(src), tmp_path / "out", shard_size=5, val_fraction=0, compress=True,
                 workers=1, progress=False)  # fmt: skip
    index = load_index(tmp_path / "out")
    table = sample_table(index, "train")
    assert (
        all(p.name.endswith(".tar.gz") for p in table.shard_paths) and len(table.shard_paths) == 6
    )
    reader = pickle.loads(pickle.dumps(ShardReader(table.shard_paths, cache_shards=2)))
    imgs = [decode_image(reader.read(table.shard[i], table.offset[i], table.size[i]), "npy", 3)
            for i in range(len(table))]  # fmt: skip
    assert len(imgs) == 30 and len(reader._gz) == 2  # inflated on disk, 2 at a time
    assert "verified 30 samples in 6 shards" in verify_shards(tmp_path / "out", progress=False)


def test_info_text_class_table(tmp_path, tiny_shards):
    text = info_text(tiny_shards)
    assert "per-class counts" in text and "ratio: 1.00" in text and "IMBALANCED" not in text
    src = make_image_folder(tmp_path / "src", ["many", "few"], 2, size=8)
    make_image_folder(tmp_path / "src", ["many"], 6, size=8, seed=1)
    write_shards(str(src), tmp_path / "out", val_fraction=0, workers=1, progress=False)
    text = info_text(tmp_path / "out")
    assert "IMBALANCED" in text and "ratio: 3.00" in text
    raw = json.loads((tmp_path / "out" / "index.json").read_text())
    assert raw["splits"]["train"]["class_counts"] == [2, 6]


def test_gz_shard_is_inflated_to_disk_not_memory(tmp_path):
    """A .tar.gz shard is inflated into a temporary file: reading a sample from a ~16 MB shard
    allocates kilobytes, not the inflated shard (what a worker held 4 of before)."""
    import io
    import tracemalloc

    from shardtrain.data.shard_writer import SplitShardWriter

    rng = np.random.default_rng(0)
    writer = SplitShardWriter(tmp_path, "train", shard_size=1400, compress=True)
    for i in range(1400):
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # incompressible
        writer.add("npy", buf.getvalue(), label=i % 2)
    writer.close()
    side = json.loads((tmp_path / "train-000000.samples.json").read_text())
    reader = ShardReader([tmp_path / "train-000000.tar.gz"])
    tracemalloc.start()
    data = reader.read(0, side["offsets"][-1], side["sizes"][-1])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert decode_image(data, "npy", 3).shape == (3, 64, 64)
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB allocated to read one sample"


def test_a_damaged_npy_member_is_reported_corrupt_never_loaded_unsafely(tmp_path, tiny_shards):
    """numpy's own message for these suggests loading "unsafely using allow_pickle": the
    report must say the sample is corrupt instead (shardtrain never unpickles data)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([None, 1], dtype=object), allow_pickle=True)  # an object-array header
    for data in (b"garbage!" + bytes(100), buf.getvalue()):
        with pytest.raises(ValueError, match="corrupt npy") as err:
            decode_image(data, "npy", 3)
        assert "pickle" not in str(err.value)
    d = copy(tiny_shards, tmp_path)
    table = sample_table(load_index(d), "train")
    i = int(np.flatnonzero(table.shard == 1)[2])
    shard = d / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[int(table.offset[i]):int(table.offset[i]) + 8] = b"garbage!"
    shard.write_bytes(bytes(data))
    r = run_shardtrain(["verify", d], check=False)
    assert r.returncode == 1 and f"sample {i:08d}: corrupt npy" in r.stderr
    assert "pickle" not in r.stderr
