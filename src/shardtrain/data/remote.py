"""Read shards and indexes that live behind URLs (http(s)://, s3://, gs://, ...) through fsspec.

fsspec is what webdataset/wids, Hugging Face datasets and MosaicML streaming users already pass
URLs to; its backends are optional: `pip install 'shardtrain[s3]'` (s3fs) or `'shardtrain[gcs]'`
(gcsfs); http(s) needs aiohttp, installed with shardtrain. S3-compatible stores (MinIO, Ceph)
are reached through the standard AWS configuration (`AWS_ENDPOINT_URL`, keys, profile).

    from shardtrain.data.remote import Retry, read_url, download
    index_bytes = read_url("http://host/shards/index.json", Retry())
    nbytes = download("s3://bucket/shards/train-000000.tar", tmp_path, Retry(),
                      sha256="...", inflate=False)

Transient faults (connection resets, timeouts, HTTP 5xx/408/429, a body cut short) are retried
with exponential backoff and jitter; a 4xx (missing object, access denied) fails at once naming
the URL. After the last retry the error is a DataError (exit 1) naming the URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from shardtrain.errors import DataError, UserError

CHUNK = 1 << 20  # bytes per read while streaming a shard: memory stays flat whatever its size
INSTALL = {"s3": "s3fs: pip install 'shardtrain[s3]'", "gs": "gcsfs: pip install 'shardtrain[gcs]'",
           "gcs": "gcsfs: pip install 'shardtrain[gcs]'", "http": "aiohttp: pip install aiohttp",
           "https": "aiohttp: pip install aiohttp"}
CLIENT_LIBRARIES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google")


def is_url(path: str) -> bool:
    """True for `scheme://...` other than file:// (those are read in place like a path)."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and scheme.isalnum() and scheme != "file"


def local_path(path: str) -> Path:
    """A local folder or file given as a path or a file:// URL."""
    return Path(path[len("file://"):] if str(path).startswith("file://") else path)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def filesystem(url: str):
    """(fsspec filesystem, path) for a URL; a missing backend is a one-line UserError."""
    try:
        import fsspec
    except ImportError:
        raise UserError(f"reading {url} needs fsspec: pip install fsspec") from None
    scheme = url.partition("://")[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        need = INSTALL.get(scheme, f"the fsspec backend for {scheme}:// (see fsspec's list)")
        raise UserError(f"reading {scheme}:// URLs needs {need}") from None
    except ValueError as e:  # unknown protocol
        raise UserError(f"cannot read {url}: {e}") from None


@dataclass(frozen=True)
class Retry:
    """How often and how patiently to retry a transient fault (a picklable config slice)."""

    attempts: int = 6  # tries in all, the first included
    delay: float = 1.0  # seconds before the first retry, doubled each time (+-50% jitter)

    def wait(self, attempt: int, rng: random.Random) -> None:
        time.sleep(self.delay * (2 ** attempt) * rng.uniform(0.5, 1.5))


def is_transient(e: BaseException) -> bool:
    """Worth retrying: connection errors, timeouts, 5xx/408/429, a body cut short."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError
    if status is None:  # botocore ClientError
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") \
            if isinstance(getattr(e, "response", None), dict) else None
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    if isinstance(e, (OSError, asyncio.TimeoutError, TimeoutError, EOFError, ShortBody)):
        return True
    return type(e).__module__.split(".")[0] in CLIENT_LIBRARIES


class NotFound(DataError):
    """The URL answers that nothing is there (404, NoSuchKey): not retried."""


class ShortBody(Exception):
    """The bytes received do not match the index (size or sha256): a transfer cut short."""


def with_retries(what: str, url: str, retry: Retry, fn):
    """fn() with retries on transient faults; DataError naming the URL when it gives up."""
    rng = random.Random()  # jitter only: never touches the training RNG streams
    for attempt in range(retry.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if isinstance(e, FileNotFoundError):
                raise NotFound(f"{what} {url}: not found") from None
            if not is_transient(e):
                raise DataError(f"{what} {url}: {describe(e)}") from None
            if attempt + 1 == retry.attempts:
                raise DataError(f"{what} {url}: failed after {retry.attempts} attempts: "
                                f"{describe(e)}") from None
            retry.wait(attempt, rng)


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_url(url: str, retry: Retry) -> bytes:
    """The whole (small) file at url: index.json, a sidecar."""
    fs, path = filesystem(url)
    return with_retries("reading", url, retry, lambda: fs.cat_file(path))


def download(url: str, dest: Path, retry: Retry, *, sha256: str, size: int,
             inflate: bool) -> int:
    """Stream url into dest (gunzipped when `inflate`), checking size and sha256 of the bytes
    received; returns the bytes transferred (the successful attempt's). Retries from the start."""
    fs, path = filesystem(url)
    # http(s): one streamed GET (block_size=0) rather than one Range request per block, and
    # no HEAD request first (the size is known from the index)
    stream = {"block_size": 0, "size": size} if url.startswith(("http://", "https://")) else {}

    def attempt() -> int:
        digest, received = hashlib.sha256(), 0
        gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if inflate else None
        with fs.open(path, "rb", **stream) as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                received += len(chunk)
                out.write(gunzip.decompress(chunk) if gunzip else chunk)
            if gunzip:
                out.write(gunzip.flush())
            out.flush()
            os.fsync(out.fileno())  # on disk before the caller renames it into the cache
        if received != size or digest.hexdigest() != sha256:
            raise ShortBody(f"got {received} bytes (index: {size}), sha256 "
                            f"{'matches' if digest.hexdigest() == sha256 else 'differs'}")
        return received

    return with_retries("downloading", url, retry, attempt)
