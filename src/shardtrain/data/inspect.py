"""Inspect packed shards: `shardtrain info` (summary, per-class counts) and `shardtrain verify`
(re-hash, walk every tar, check sidecar offsets and labels, decode every image).

    from shardtrain.data.inspect import info_text, verify_shards
    print(info_text("shards/fashion-mnist-12k"))
    print(verify_shards("shards/fashion-mnist-12k"))   # DataError names the first bad sample
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from tqdm import tqdm

from shardtrain.data.codec import decode_image
from shardtrain.data.index import Index, ShardReader, load_sidecar, load_index, sha256_file
from shardtrain.data.remote import is_url
from shardtrain.errors import DataError, UserError


def _split_lines(index: Index) -> list[str]:
    lines = []
    for name, sp in index.splits.items():
        nbytes = sum(s["bytes"] for s in sp.shards)
        lines.append(f"  {name:<6} {sp.num_samples:>8} samples  {len(sp.shards):>4} shards  "
                     f"{nbytes / 1e6:8.2f} MB")  # fmt: skip
    return lines


def _class_table(index: Index) -> list[str]:
    names = list(index.splits)
    width = max(len(c) for c in index.classes)
    lines = [f"  {'class':<{width}} " + " ".join(f"{n:>8}" for n in names)]
    for i, c in enumerate(index.classes):
        lines.append(
            f"  {c:<{width}} " + " ".join(f"{index.splits[n].class_counts[i]:>8}" for n in names)
        )
    counts = index.splits["train"].class_counts
    lo, hi = min(counts), max(counts)
    ratio = hi / lo if lo else float("inf")
    flag = "  IMBALANCED (> 1.5)" if ratio > 1.5 else ""
    lines.append(f"  train max/min class ratio: {ratio:.2f}{flag}")
    return lines


def info_text(dir: str | Path) -> str:
    """Human-readable summary of a packed dataset (what `shardtrain info` prints)."""
    index = load_index(dir)
    raw = index.raw
    size = (
        "x".join(map(str, index.image_size))
        if index.image_size
        else (f"varies {raw['image_size_range']['min']}..{raw['image_size_range']['max']}")
    )
    lines = [f"name:     {index.name}  ({index.root})",
             f"classes:  {len(index.classes)}",
             f"channels: {index.channels}   image size: {size}",
             f"mean:     {index.mean}   std: {index.std}",
             "splits:", *_split_lines(index)]  # fmt: skip
    skipped = raw.get("skipped", [])
    lines.append(f"skipped:  {raw.get('num_skipped', len(skipped))}")
    lines += [f"  {s['split']}: {s['path']}: {s['reason']}" for s in skipped[:5]]
    if len(skipped) > 5:
        lines.append(f"  ... and {len(skipped) - 5} more (see index.json)")
    return "\n".join(lines + ["per-class counts:", *_class_table(index)])


def _verify_members(path: Path, side: dict, reader: ShardReader, shard: int, channels: int) -> None:
    """Walk the tar in order; check names, offsets, .cls labels and that every image decodes."""
    key = side["keys"][0] if side["keys"] else "-"
    columns = [side[k] for k in ("keys", "labels", "exts", "offsets", "sizes")]
    try:
        with tarfile.open(path, "r:*") as tar:
            members = iter(tar)
            for key, label, ext, off, size in zip(*columns, strict=True):
                img, cls = next(members, None), next(members, None)
                if (
                    img is None
                    or cls is None
                    or img.name != f"{key}.{ext}"
                    or cls.name != f"{key}.cls"
                ):
                    raise ValueError(
                        f"tar members {img and img.name}, {cls and cls.name} out of order"
                    )
                if (img.offset_data, img.size) != (off, size):
                    raise ValueError("sidecar offset/size disagree with the tar header")
                data = tar.extractfile(img).read()
                if data != reader.read(shard, off, size):
                    raise ValueError("bytes at sidecar offset differ from the tar member")
                if tar.extractfile(cls).read().decode("ascii", "replace").strip() != str(label):
                    raise ValueError(f".cls does not say {label}")
                decode_image(data, ext, channels)
            extra = next(members, None)
            if extra is not None:
                raise ValueError(f"unexpected extra member {extra.name}")
    except (ValueError, OSError, EOFError, tarfile.TarError, DataError) as e:
        raise DataError(f"{path.name}: sample {key}: {e}") from None


def _verify_adopted(path: Path, side: dict, reader: ShardReader, shard: int,
                    channels: int) -> None:
    """Shards from other tools: every sidecar offset is its `KEY.EXT` member; images decode."""
    key = "-"
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        for key, ext, off, size in zip(side["keys"], side["exts"], side["offsets"],
                                       side["sizes"], strict=True):
            if members.get(f"{key}.{ext}") != (off, size):
                raise ValueError("sidecar offset/size disagree with the tar header")
            decode_image(reader.read(shard, off, size), ext, channels)
    except (ValueError, OSError, EOFError, tarfile.TarError, DataError) as e:
        raise DataError(f"{path.name}: sample {key}: {e}") from None


def verify_shards(dir: str | Path, progress: bool = True) -> str:
    """Re-hash and fully decode every shard; DataError names the first bad shard/sample."""
    index = load_index(dir)
    if is_url(index.shard_base):
        raise UserError(f"verify reads local shards; these are at {index.shard_base} (training "
                        f"checks each one's sha256 as it downloads it)")
    base = Path(index.shard_base)
    total = sum(sp.num_samples for sp in index.splits.values())
    n_shards = 0
    with tqdm(total=total, disable=not progress, unit="img", desc="verify") as bar:
        for name, sp in index.splits.items():
            first, counts = 0, [0] * len(index.classes)
            paths = [base / s["file"] for s in sp.shards]
            reader = ShardReader(paths, cache_shards=1)
            check = _verify_adopted if index.adopted else _verify_members
            for i, s in enumerate(sp.shards):
                side = load_sidecar(index.root, s, first, len(index.classes), damaged := [],
                                    not index.adopted, base)
                if damaged:
                    raise DataError(damaged[0])
                check(paths[i], side, reader, i, index.channels)
                if sha256_file(paths[i]) != s["sha256"]:
                    raise DataError(f"{s['file']}: sha256 mismatch with index.json (corrupt shard)")
                for y in side["labels"]:
                    counts[y] += 1
                first += s["num_samples"]
                n_shards += 1
                bar.update(s["num_samples"])
            reader.close()
            if counts != sp.class_counts:
                raise DataError(
                    f"{index.root}/index.json: split {name}: class_counts disagree with shards"
                )
    return f"verified {total} samples in {n_shards} shards: all checksums, offsets and images OK"
