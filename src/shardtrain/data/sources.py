"""Readers of raw datasets: image-folder trees, CIFAR python batches, MNIST-style IDX, torchvision.

`open_source(SOURCE)` detects the layout and returns a `Source`: class names, native channel
count and, per split, a list of `Item`s (a file path or an in-memory uint8 array, plus a label).
Nothing is decoded here except the array formats; image files are decoded by the pack workers.

    from shardtrain.data.sources import open_source
    src = open_source("/usr/share/datasets/fashion-mnist")
    print(src.kind, src.classes, {k: len(v) for k, v in src.splits.items()})
"""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardtrain.data.image_folder import read_image_folder
from shardtrain.errors import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
LAYOUTS = (
    "recognised layouts: an image-folder tree (class sub-folders, optionally under "
    "train/val/test split folders), a CIFAR-10/100 python batches folder, an MNIST-style IDX "
    "folder (train-images-idx3-ubyte[.gz], ...), or torchvision:NAME"
)


@dataclass
class Item:
    """One raw sample: a file to decode, or an array (H, W) / (H, W, 3) uint8."""

    label: int
    path: str | None = None
    array: np.ndarray | None = None


@dataclass
class Source:
    kind: str  # imagefolder | cifar | idx | torchvision
    path: str
    classes: list[str]
    channels: int  # native channel count: 1 for gray IDX, 3 otherwise
    splits: dict[str, list[Item]]
    skipped: list[dict] = field(default_factory=list)


def _array_items(images: np.ndarray, labels: np.ndarray) -> list[Item]:
    return [Item(int(y), array=images[i]) for i, y in enumerate(labels)]


# --- IDX (MNIST / FashionMNIST) -------------------------------------------------------------


def _read_idx(path: Path, magic: int) -> np.ndarray:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise UserError(f"{path}: not an IDX file with magic {magic:#010x}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: expected {int(np.prod(dims))} bytes of data, found {body.size}")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for p in (root / stem, root / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def _read_idx_dir(root: Path, classes: list[str] | None) -> Source:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_p, lab_p = (
            _find(root, f"{prefix}-images-idx3-ubyte"),
            _find(root, f"{prefix}-labels-idx1-ubyte"),
        )
        if img_p is None or lab_p is None:
            if split == "train":
                raise UserError(f"{root}: IDX train images/labels file missing")
            continue
        images, labels = _read_idx(img_p, 0x803), _read_idx(lab_p, 0x801)
        if len(images) != len(labels):
            raise UserError(f"{root}: {split} has {len(images)} images but {len(labels)} labels")
        splits[split] = _array_items(images, labels)
    n_cls = 1 + max(it.label for items in splits.values() for it in items)
    if classes is None:
        classes = FASHION_CLASSES if "fashion" in str(root).lower() else [str(i) for i in range(10)]
    if len(classes) < n_cls:
        raise UserError(f"{root}: labels go up to {n_cls - 1} but only {len(classes)} class names")
    return Source("idx", str(root), list(classes), 1, splits)


# --- CIFAR python batches -------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles from Python 3 store bytes this way; data only
}  # fmt: skip


class _NumpyUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction is allowed: a CIFAR file must not run arbitrary code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in pickle")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias in numpy 2
            return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{path}: cannot read CIFAR batch: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: CIFAR batch is not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    labels = d.get("labels", d.get("fine_labels"))
    data = np.asarray(d.get("data"), dtype=np.uint8)
    if labels is None or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path}: unexpected CIFAR batch contents")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, np.int64)


def _cifar_root(root: Path) -> Path | None:
    for cand in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (
            (cand / "data_batch_1").is_file()
            or (cand / "meta").is_file()
            and (cand / "train").is_file()
        ):
            return cand
    return None


def _read_cifar(root: Path, classes: list[str] | None) -> Source:
    if (root / "data_batch_1").is_file():
        train_files = sorted(root.glob("data_batch_[0-9]*"))
        test_file, meta, key = root / "test_batch", root / "batches.meta", "label_names"
    else:
        train_files, test_file, meta, key = (
            [root / "train"],
            root / "test",
            root / "meta",
            "fine_label_names",
        )
    splits = {}
    for split, files in (
        ("train", train_files),
        ("test", [test_file] if test_file.is_file() else []),
    ):
        if files:
            parts = [_cifar_batch(p) for p in files]
            splits[split] = _array_items(np.concatenate([p[0] for p in parts]),
                                         np.concatenate([p[1] for p in parts]))  # fmt: skip
    if classes is None and meta.is_file():
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _unpickle(meta)[key]]
    n_cls = 1 + max(it.label for it in splits["train"])
    classes = classes or [str(i) for i in range(n_cls)]
    return Source("cifar", str(root), list(classes), 3, splits)


# --- torchvision ----------------------------------------------------------------------------


def _extract_cached_gz(raw: Path) -> None:
    """Unpack raw/*.gz copied in by hand (e.g. from a distro package) so torchvision finds the
    files without downloading; its md5 check would reject re-compressed .gz files."""
    for gz in sorted(raw.glob("*.gz")) if raw.is_dir() else []:
        target = gz.with_suffix("")
        if not target.exists():
            tmp = target.with_name(target.name + ".part")
            tmp.write_bytes(gzip.decompress(gz.read_bytes()))
            tmp.replace(target)


def _read_torchvision(name: str, classes: list[str] | None) -> Source:
    import torchvision.datasets as tvd  # heavy import: only when asked for

    cls = getattr(tvd, name, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset {name!r}")
    cache = Path(
        os.environ.get("SHARDTRAIN_CACHE") or Path.home() / ".cache/shardtrain/torchvision"
    )
    _extract_cached_gz(cache / name / "raw")
    splits, names = {}, None
    for split, train in (("train", True), ("test", False)):
        try:
            ds = cls(root=str(cache), train=train, download=True)
        except TypeError:
            raise UserError(
                f"torchvision:{name}: only datasets with a train= argument are supported"
            ) from None
        except Exception as e:
            raise UserError(f"torchvision:{name} is not in the cache {cache} and download failed "
                            f"(offline?): {e}") from None  # fmt: skip
        if not hasattr(ds, "data") or not hasattr(ds, "targets"):
            raise UserError(f"torchvision:{name}: dataset has no .data/.targets arrays")
        data = np.asarray(ds.data).astype(np.uint8, copy=False)
        splits[split] = _array_items(data, np.asarray(ds.targets, np.int64))
        names = list(getattr(ds, "classes", []) or [])
    channels = 1 if splits["train"][0].array.ndim == 2 else 3
    n_cls = 1 + max(it.label for it in splits["train"])
    names = classes or names or [str(i) for i in range(n_cls)]
    return Source("torchvision", f"torchvision:{name}", names, channels, splits)


# --- detection ------------------------------------------------------------------------------


def open_source(source: str, classes: list[str] | None = None) -> Source:
    """Detect SOURCE's layout and read its split lists (UserError when unrecognised)."""
    if source.startswith("torchvision:"):
        return _read_torchvision(source.split(":", 1)[1], classes)
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"source {source} is not a directory; {LAYOUTS}")
    if _find(root, "train-images-idx3-ubyte"):
        return _read_idx_dir(root, classes)
    if (croot := _cifar_root(root)) is not None:
        return _read_cifar(croot, classes)
    found = read_image_folder(root, classes)
    if found is None:
        raise UserError(f"no dataset found in {source}; {LAYOUTS}")
    splits, names, skipped = found
    items = {s: [Item(y, path=p) for p, y in files] for s, files in splits.items()}
    return Source("imagefolder", str(root), names, 3, items, skipped)
