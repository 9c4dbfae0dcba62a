"""Shared pytest fixtures: tiny packed datasets made with our own write_shards.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardtrain.data.pack import write_shards
from skip_guard import pytest_configure  # noqa: F401  (SHARDTRAIN_ALLOWED_SKIPS, for CI)


def make_image_folder(
    root: str | Path,
    classes: list[str],
    n_per_class: int | dict[str, int],
    size: int = 16,
    ext: str = "png",
    split_dirs: tuple[str, ...] | None = None,
    seed: int = 0,
) -> Path:
    """Write random RGB images as root/[split/]class/class_i.ext; returns root.

    n_per_class may be a dict {split: n} when split_dirs is given.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in split_dirs or (None,):
        n = n_per_class[split] if isinstance(n_per_class, dict) else n_per_class
        for c in classes:
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """64 random 16x16 RGB images, 4 classes: train 56 in 4 shards of 14, val 8 (npy members)."""
    base = tmp_path_factory.mktemp("tiny")
    src = make_image_folder(base / "src", ["a", "b", "c", "d"], 16, size=16)
    out = base / "shards"
    write_shards(str(src), out, shard_size=14, val_fraction=0.125, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """train 90 samples in shards of 20,20,20,20,10 (no val) and a test split of 33."""
    base = tmp_path_factory.mktemp("uneven")
    src = make_image_folder(base / "src", ["x", "y", "z"], {"train": 30, "test": 11}, size=8,
                            split_dirs=("train", "test"))  # fmt: skip
    out = base / "shards"
    write_shards(str(src), out, shard_size=20, val_fraction=0.0, workers=1, progress=False)
    return out


def make_learnable_folder(root: Path, n_per_class: dict[str, int], size: int = 16) -> Path:
    """4 classes a learnable model separates: each class tints one colour channel (+ noise)."""
    rng = np.random.default_rng(1)
    for split, n in n_per_class.items():
        for c, name in enumerate(["red", "green", "blue", "gray"]):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 120, (size, size, 3))
                arr[..., c % 3] += 120 if c < 3 else 60
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def learnable_shards(tmp_path_factory) -> Path:
    """4 separable classes of 16x16 RGB: train 192 (6 shards of 32), val 32, test 40."""
    base = tmp_path_factory.mktemp("learnable")
    src = make_learnable_folder(base / "src", {"train": 48, "val": 8, "test": 10})
    out = base / "shards"
    write_shards(str(src), out, shard_size=32, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_recipe() -> Path:
    return Path(__file__).parent / "recipes" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def wandb_data_dir(tmp_path_factory):
    """wandb's staging copies of offline artifacts go to a temporary folder, not ~/.local/share
    (subprocesses inherit the variable)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb-data")))
    yield
    patch.undo()
