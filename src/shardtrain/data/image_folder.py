"""Image-folder trees: one sub-folder per class, optionally under split folders.

Recognised split folders: train/ val|valid|validation/ test/, Fruits-360's Training/ Test/ and
Intel scenes' seg_train/ seg_test/ (also nested as seg_train/seg_train/). Symlinks leaving the
root, empty files and empty class folders are skipped and listed, never silently dropped.

    splits, classes, skipped = read_image_folder(Path("flowers/"), classes=None)
    # splits: {"train": [(path, label), ...], "test": [...]}
"""

from __future__ import annotations

import os
from pathlib import Path

from shardtrain.errors import UserError

SPLIT_ALIASES = {"train": "train", "training": "train", "seg_train": "train", "val": "val",
                 "valid": "val", "validation": "val", "test": "test", "testing": "test",
                 "seg_test": "test"}  # fmt: skip


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != ".")


def _list_files(root: Path, cdir: Path, split: str, skipped: list[dict]) -> list[str]:
    """Sorted candidate files of one class folder; unusable entries go to `skipped`."""
    out, real_root = [], root.resolve()
    for dirpath, dirnames, filenames in os.walk(cdir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink() and not p.resolve().is_relative_to(real_root):
                skipped.append(
                    {"path": rel, "split": split, "reason": "symlink leaves source root"}
                )
            elif not p.is_file():
                skipped.append({"path": rel, "split": split, "reason": "not a regular file"})
            elif p.stat().st_size == 0:
                skipped.append({"path": rel, "split": split, "reason": "empty file"})
            else:
                out.append(str(p))
    return out


def _split_dirs(root: Path, skipped: list[dict]) -> dict[str, Path]:
    """{split: folder} for train/val/test folders (Intel's seg_train/seg_train nesting too)."""
    found = {}
    for d in _subdirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is None or split in found:
            skipped.append({"path": d.name, "split": "", "reason": "folder is not a split"})
            continue
        inner = _subdirs(d)
        if len(inner) == 1 and inner[0].name.lower() == d.name.lower():
            d = inner[0]
        found[split] = d
    return found


def read_image_folder(root: Path, classes: list[str] | None):
    """(splits {split: [(path, label)]}, class names, skipped) or None if no class folders."""
    skipped: list[dict] = []
    if not _subdirs(root):
        return None
    split_dirs = {"train": root}
    if any(d.name.lower() in SPLIT_ALIASES for d in _subdirs(root)):
        split_dirs = _split_dirs(root, skipped)
        if "train" not in split_dirs:
            raise UserError(f"{root}: split folders found but no train/training folder")
    files = {}
    for split, sdir in split_dirs.items():
        files[split] = {}
        for cdir in _subdirs(sdir):
            found = _list_files(root, cdir, split, skipped)
            if found:
                files[split][cdir.name] = found
            else:
                skipped.append({"path": str(cdir.relative_to(root)), "split": split,
                                "reason": "empty class folder"})  # fmt: skip
    names = sorted(files["train"])
    if not names:
        raise UserError(f"{root}: no class folder with files in the train split")
    for split, by_cls in files.items():
        extra = sorted(set(by_cls) - set(names))
        if extra:
            raise UserError(f"{root}: classes only in {split}, not in train: {', '.join(extra)}")
    if classes is not None:
        if sorted(classes) != names:
            raise UserError(f"--classes {classes} do not match the class folders {names}")
        names = list(classes)
    label = {c: i for i, c in enumerate(names)}
    splits = {s: [(p, label[c]) for c in names for p in by_cls.get(c, [])]
              for s, by_cls in files.items()}  # fmt: skip
    return splits, names, skipped


