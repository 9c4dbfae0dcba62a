"""`shardtrain index SOURCE [--out DIR]`: adopt WebDataset shards written by any tool.

SOURCE is a folder or URL of `.tar`/`.tar.gz` shards, or a brace pattern
(`https://host/data/train-{000000..000099}.tar`). Each shard is streamed once: its tar headers
give every sample's members and byte offsets (WebDataset convention: members sharing a key,
`KEY.EXT`, are one sample), its bytes give the sha256 recorded in index.json; only the label
members and a small sample of images (mean/std, size, channels) are decoded. index.json and one
`.samples.json` sidecar per shard go into SOURCE when it is a writable folder, else into --out
(then `--data DIR` trains from DIR and the shards are read from SOURCE, recorded as shard_base).

    shardtrain index shards/from-img2dataset                          # jpg + cls, in place
    shardtrain index https://host/ds/ --out shards/ds --label-key label    # json labels

Labels: `.cls` (an integer), a `.json` field (--label-key), or `.txt` (a class name); class
names from --classes FILE (one per line) or from the labels seen. Splits from file-name prefixes
(train/val|valid|validation/test, then - _ or .; `--split-prefix val=dev` replaces a split's),
else --val-fraction of the shards (the last ones). Samples without an image or a label are
skipped and listed; a shard that is not a tar is a one-line error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shardtrain import __version__
from shardtrain.data.adopt_read import IMAGE_EXTS, ShardScan, image_stats, list_shards, scan_shard
from shardtrain.data.remote import is_url, local_path
from shardtrain.errors import UserError

SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def split_names(prefixes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """SPLIT_NAMES with `--split-prefix SPLIT=PREFIX` items replacing a split's defaults."""
    given: dict[str, list[str]] = {}
    for item in prefixes:
        split, sep, prefix = item.partition("=")
        if not sep or split not in SPLIT_NAMES or not prefix:
            raise UserError(f"--split-prefix {item}: expected SPLIT=PREFIX with SPLIT one of "
                            f"{', '.join(SPLIT_NAMES)}")
        given.setdefault(split, []).append(prefix)
    return {**SPLIT_NAMES, **{k: tuple(v) for k, v in given.items()}}


def split_of(name: str, names: dict[str, tuple[str, ...]]) -> str | None:
    for split, prefixes in names.items():
        if any(name.startswith(p) and name[len(p):len(p) + 1] in "-_." for p in prefixes):
            return split
    return None


def assign_splits(names: list[str], val_fraction: float,
                  prefixes: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """{split: shard names} from the name prefixes, else the last shards become val."""
    found = {name: split_of(name, prefixes) for name in names}
    if not any(found.values()):
        n_val = round(len(names) * val_fraction) if len(names) > 1 else 0
        n_val = max(n_val, 1) if val_fraction > 0 and len(names) > 1 else n_val
        return {"train": names[:len(names) - n_val], "val": names[len(names) - n_val:]}
    unknown = [n for n, s in found.items() if s is None]
    if unknown:
        known = "/".join(f"{p}-" for ps in prefixes.values() for p in ps)
        raise UserError(f"cannot tell the split of {unknown[0]} (others are named {known}): "
                        f"rename it, index its folder apart or pass --split-prefix")
    return {s: [n for n in names if found[n] == s] for s in SPLIT_NAMES}


def read_classes(path: str) -> list[str]:
    if not path:
        return []
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"--classes {path}: {e.strerror}") from None
    if len(set(names)) != len(names):
        raise UserError(f"--classes {path}: class names repeat")
    return names


def class_names(scans: list[ShardScan], given: list[str]) -> list[str]:
    """The class list: --classes, else 0..max for integer labels, else the sorted names."""
    raw = [y for scan in scans for y in scan.raw_labels]
    if given:
        return given
    if all(isinstance(y, int) for y in raw):
        return [str(i) for i in range(max(raw) + 1)]
    if any(isinstance(y, int) for y in raw):
        raise UserError("labels mix integers and names: pass --classes FILE to map them")
    return sorted(set(raw))


def label_ids(scan: ShardScan, classes: list[str], skipped: list, split: str) -> list[int]:
    """Integer labels of a scan's samples; unknown names/out-of-range ids are skipped."""
    lookup, ids, keep = {c: i for i, c in enumerate(classes)}, [], []
    for j, y in enumerate(scan.raw_labels):
        i = y if isinstance(y, int) else lookup.get(y)
        if i is None or not 0 <= i < len(classes):
            skipped.append({"path": f"{scan.name}:{scan.keys[j]}", "split": split,
                            "reason": f"label {y!r} not among the classes"})
            continue
        ids.append(i)
        keep.append(j)
    scan.keep(keep)
    return ids


def destination(source: str, out: str | None) -> tuple[Path, str | None]:
    """(folder for index.json + sidecars, shard_base to record or None for 'same folder')."""
    base = source if is_url(source) else str(local_path(source).resolve())
    if out:
        return Path(out), base
    if is_url(source) or not os.access(local_path(source), os.W_OK):
        raise UserError(f"{source} is not a writable folder: pass --out DIR for index.json "
                        f"and the sidecars (the shards stay where they are)")
    return local_path(source), None


def index_shards(source: str, out: str | None = None, *, label_key: str = "",
                 classes_file: str = "", image_exts: tuple[str, ...] = IMAGE_EXTS,
                 val_fraction: float = 0.0, channels: int = 0, stats_samples: int = 500,
                 overwrite: bool = False, progress: bool = True,
                 split_prefixes: tuple[str, ...] = ()) -> dict:
    """Scan SOURCE's shards and write index.json + sidecars; returns the index."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    prefixes = split_names(split_prefixes)
    base, names = list_shards(source)
    folder, shard_base = destination(base if "{" in source else source, out)
    if (folder / "index.json").exists() and not overwrite:
        raise UserError(f"{folder / 'index.json'} exists: pass --overwrite to replace it")
    splits = {s: n for s, n in assign_splits(names, val_fraction, prefixes).items() if n}
    if "train" not in splits:
        raise UserError(f"no train shards in {source} (names: {', '.join(names[:3])}...)")
    budget = [stats_samples]
    scans = {s: [scan_shard(base, n, label_key, image_exts, budget, progress) for n in ns]
             for s, ns in splits.items()}
    skipped = [{**sk, "split": s} for s, ss in scans.items() for sc in ss for sk in sc.skipped]
    if not any(sc.keys for sc in scans["train"]):
        raise UserError(f"nothing usable in {source}: no train sample with an image and a label "
                        f"({skipped[0]['reason'] if skipped else 'no samples'})")
    classes = class_names([sc for ss in scans.values() for sc in ss], read_classes(classes_file))
    folder.mkdir(parents=True, exist_ok=True)
    index_splits = {}
    for split, split_scans in scans.items():
        counts, shards = [0] * len(classes), []
        for scan in split_scans:
            labels = label_ids(scan, classes, skipped, split)
            for y in labels:
                counts[y] += 1
            if labels:
                shards.append(scan.write_sidecar(folder, labels))
        if shards:
            index_splits[split] = {"num_samples": sum(counts), "class_counts": counts,
                                   "shards": shards}
    if "train" not in index_splits:
        raise UserError(f"nothing usable in {source}: no train sample with an image and a label "
                        f"({skipped[0]['reason'] if skipped else 'no samples'})")
    train_scans = scans["train"]
    index = make_index(folder, source, shard_base, classes, train_scans, channels,
                       index_splits, skipped, label_key)
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(sp["num_samples"] for sp in index_splits.values())
    parts = ", ".join(f"{k} {v['num_samples']}" for k, v in index_splits.items())
    n_shards = sum(len(v["shards"]) for v in index_splits.values())
    print(f"indexed {total} samples ({parts}) in {n_shards} shards, {len(skipped)} skipped "
          f"-> {folder / 'index.json'}")
    return index


def make_index(folder: Path, source: str, shard_base: str | None, classes: list[str],
               train_scans: list[ShardScan], channels: int, splits: dict, skipped: list,
               label_key: str) -> dict:
    stats = image_stats([im for sc in train_scans for im in sc.stat_images], channels)
    index = {"format_version": 1, "name": folder.resolve().name, "classes": classes,
             "channels": stats["channels"], "image_size": stats["image_size"],
             "image_size_range": stats["range"], "mean": stats["mean"], "std": stats["std"],
             "splits": splits, "skipped": skipped, "num_skipped": len(skipped),
             "source": {"kind": "adopted", "path": source},
             "index_options": {"label_key": label_key, "stats_samples": stats["n"]},
             "created_by": f"shardtrain {__version__} index"}
    if shard_base:
        index["shard_base"] = shard_base
    return index

