"""`shardtrain index`: shards written by plain webdataset.ShardWriter train after indexing.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_adopt.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from helpers import RUNS, read_json, run_shardtrain
from servers import Nginx
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.inspect import verify_shards
from shardtrain.tracking.artifacts import dataset_artifact

pytestmark = RUNS  # real training subprocesses

CLASSES = ["red", "green", "blue", "gray"]


def jpeg(c: int, rng, size: int = 16) -> bytes:
    """A learnable image: class c tints one colour channel."""
    arr = rng.integers(0, 120, (size, size, 3))
    arr[..., c % 3] += 120 if c < 3 else 60
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_webdataset(folder: Path, split: str, n: int, label: str, seed: int = 0,
                     suffix: str = ".tar", per_shard: int = 24) -> None:
    """`n` samples with webdataset.ShardWriter: jpg + cls, jpg + txt (the class name) or
    jpg + json {"label": name}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{split}-%06d{suffix}"), maxcount=per_shard,
                         verbose=0) as sink:
        for i in range(n):
            c = i % 4
            sample = {"__key__": f"{split}/img{i:05d}", "jpg": jpeg(c, rng)}
            if label == "cls":
                sample["cls"] = c
            elif label == "txt":
                sample["txt"] = CLASSES[c]
            else:
                sample["json"] = {"label": CLASSES[c], "source": "test"}
            sink.write(sample)


@pytest.fixture(scope="module")
def cls_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    write_webdataset(folder, "train", 96, "cls")
    write_webdataset(folder, "val", 24, "cls", seed=1)
    with wds.TarWriter(str(folder / "train-000009.tar")) as tar:  # two broken samples
        tar.write({"__key__": "nolabel", "jpg": jpeg(0, np.random.default_rng(2))})
        tar.write({"__key__": "noimage", "cls": 1})
        tar.write({"__key__": "good", "jpg": jpeg(2, np.random.default_rng(3)), "cls": 2})
    return folder


def test_shardwriter_jpg_cls_folder_indexes_in_place_and_trains(cls_shards, tiny_recipe,
                                                                 tmp_path):
    r = run_shardtrain(["index", cls_shards])
    assert "indexed 121 samples (train 97, val 24)" in r.stdout and "2 skipped" in r.stdout
    index = load_index(cls_shards)
    assert index.classes == ["0", "1", "2", "3"] and index.channels == 3
    assert index.image_size == (16, 16) and index.adopted
    assert {s["path"] for s in index.raw["skipped"]} == {"train-000009.tar:nolabel",
                                                        "train-000009.tar:noimage"}
    table = sample_table(index, "train", check_checksums=True)
    assert len(table) == 97 and set(table.ext) == {"jpg"}
    assert np.bincount(table.label).tolist() == index.split("train").class_counts
    assert "verified 121 samples" in verify_shards(cls_shards, progress=False)
    out = tmp_path / "run"
    run_shardtrain(["train", "--recipe", tiny_recipe, "--data", cls_shards, "--out", out,
                    "train.epochs=3", "data.test_split="])
    final = read_json(out / "final.json")
    assert final["steps"] == 3 * (97 // 16) and final["val_samples"] == 24
    assert final["val_acc"] > 0.5  # 4 tinted classes: chance is 0.25


def test_json_labels_from_a_url_index_elsewhere_and_train(tiny_recipe, tmp_path):
    served = tmp_path / "served"
    write_webdataset(served, "train", 72, "json", suffix=".tar.gz")
    write_webdataset(served, "val", 24, "json", seed=1)
    out = tmp_path / "index"
    with Nginx(served, tmp_path / "nginx") as web:
        pattern = f"{web.url}/train-{{000000..000002}}.tar.gz"
        r = run_shardtrain(["index", pattern, "--out", out, "--label-key", "label"])
        assert "indexed 72 samples (train 72)" in r.stdout
        raw = json.loads((out / "index.json").read_text())
        assert raw["shard_base"] == web.url and raw["classes"] == sorted(CLASSES)
        assert not list(served.glob("*.samples.json"))  # nothing written next to the shards
        shard = load_index(out).split("train").shards[0]  # W&B lineage: each file where it is
        artifact, _ = dataset_artifact(load_index(out), (out / "index.json").read_bytes(), "0")
        refs = {name: entry.ref for name, entry in artifact.manifest.entries.items()}
        assert refs[f"shards/{shard['file']}"] == f"{web.url}/{shard['file']}"
        assert refs[f"shards/{shard['samples_file']}"] == (out / shard["samples_file"]).as_uri()
        run_shardtrain(["index", web.url, "--out", tmp_path / "all", "--label-key", "label"])
        assert set(load_index(tmp_path / "all").splits) == {"train", "val"}
        run = tmp_path / "run"
        run_shardtrain(["train", "--recipe", tiny_recipe, "--data", tmp_path / "all", "--out",
                        run, "train.epochs=2", "data.test_split=",
                        f"data.cache_dir={tmp_path / 'cache'}"])
    final = read_json(run / "final.json")
    assert final["steps"] == 2 * (72 // 16) and final["val_samples"] == 24
    assert final["downloaded_bytes_per_epoch"][0][0] == sum(
        p.stat().st_size for p in served.glob("train-*.tar.gz"))


def test_not_a_tar_and_no_labels_are_one_line_errors(tmp_path):
    folder = tmp_path / "bad"
    write_webdataset(folder, "train", 8, "cls")
    (folder / "train-000001.tar").write_bytes(b"this is not a tar archive" * 40)
    r = run_shardtrain(["index", folder], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "train-000001.tar: not a readable tar archive" in r.stderr
    (folder / "train-000001.tar").unlink()
    r = run_shardtrain(["index", folder, "--label-key", "label"], check=False)
    assert r.returncode == 2 and "no train sample with an image and a label" in r.stderr
    assert not (folder / "index.json").exists()


def test_txt_labels_and_split_prefixes(tmp_path):
    """Class names from .txt members; splits from --split-prefix when names are not train-/val-."""
    folder = tmp_path / "txt"
    write_webdataset(folder, "tr", 48, "txt")
    write_webdataset(folder, "dev", 24, "txt", seed=1)
    r = run_shardtrain(["index", folder, "--split-prefix", "dev"], check=False)
    assert r.returncode == 2 and "expected SPLIT=PREFIX" in r.stderr.strip().splitlines()[-1]
    run_shardtrain(["index", folder, "--split-prefix", "train=tr", "--split-prefix", "val=dev"])
    index = load_index(folder)
    assert index.classes == sorted(CLASSES)
    for split, n in (("train", 48), ("val", 24)):
        table = sample_table(index, split)
        assert len(table) == n and index.split(split).class_counts == [n // 4] * 4
        named = [index.classes[y] for y in table.label]
        assert named == [CLASSES[i % 4] for i in range(n)]  # each sample's own .txt label
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")  # --classes sets the ids
    run_shardtrain(["index", folder, "--split-prefix", "train=tr", "--split-prefix", "val=dev",
                    "--classes", tmp_path / "classes.txt", "--overwrite"])
    index = load_index(folder)
    assert index.classes == CLASSES
    assert sample_table(index, "train").label.tolist() == [i % 4 for i in range(48)]
