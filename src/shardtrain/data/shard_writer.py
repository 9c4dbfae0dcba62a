"""SplitShardWriter: one split's samples -> `{split}-{i:06d}.tar[.gz]` shards + sidecars.

Each sample is two tar members, `KEY.EXT` (the encoded image) and `KEY.cls` (the label as ASCII),
so the shards are plain WebDataset. Next to each shard a `{split}-{i:06d}.samples.json` sidecar
records every sample's key, label, image extension, and the byte offset and size of its image
member inside the (uncompressed) tar: the loader reads a sample with one positioned read.
Tar headers carry no time or owner, and gzip no name or time: the same input gives the same bytes.

    w = SplitShardWriter(Path("shards/x"), "train", shard_size=1000, compress=False)
    w.add("npy", data, label=3); ...; w.close()     # w.shards: the index.json entries
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from shardtrain.data.index import sha256_file


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


class SplitShardWriter:
    """Writes one split's shards, `shard_size` samples each, and their sidecars."""

    def __init__(self, out_dir: Path, split: str, shard_size: int, compress: bool):
        self.out_dir, self.split = out_dir, split
        self.shard_size, self.compress = shard_size, compress
        self.shards: list[dict] = []
        self.n = 0
        self._tar = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar" + (".gz" if self.compress else "")
        self._path, self._file = self.out_dir / name, open(self.out_dir / name, "wb")
        stream = self._file
        if self.compress:  # mtime=0 and no file name: byte-identical output
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0)
        self._gz = stream if self.compress else None
        self._tar = tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT)
        self._side = {"keys": [], "labels": [], "exts": [], "offsets": [], "sizes": []}

    def add(self, ext: str, data: bytes, label: int) -> None:
        if self._tar is None:
            self._open()
        key = f"{self.n:08d}"
        ti = tar_member(f"{key}.{ext}", len(data))
        offset = self._tar.offset + len(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._tar.addfile(ti, io.BytesIO(data))
        cls = str(label).encode("ascii")
        self._tar.addfile(tar_member(f"{key}.cls", len(cls)), io.BytesIO(cls))
        for k, v in zip(self._side, (key, label, ext, offset, len(data)), strict=True):
            self._side[k].append(v)
        self.n += 1
        if len(self._side["keys"]) == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        if self._gz is not None:
            self._gz.close()
        self._file.close()
        side_path = self._path.with_name(self._path.name.split(".")[0] + ".samples.json")
        side_path.write_text(json.dumps(self._side, separators=(",", ":")))
        self.shards.append({
            "file": self._path.name, "samples_file": side_path.name,
            "num_samples": len(self._side["keys"]), "sha256": sha256_file(self._path),
            "samples_sha256": sha256_file(side_path), "bytes": self._path.stat().st_size,
        })  # fmt: skip
        self._tar = None

    def abort(self) -> None:
        """Remove everything this writer wrote (a failed pack leaves no half dataset)."""
        if self._tar is not None:
            self._file.close()
            self._path.unlink(missing_ok=True)
            self._tar = None
        for s in self.shards:
            for key in ("file", "samples_file"):
                (self.out_dir / s[key]).unlink(missing_ok=True)
        self.shards = []
