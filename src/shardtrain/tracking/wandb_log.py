"""What a resumed W&B run already holds: the last optimizer step of its history.

A job killed between checkpoints resumes from an earlier step than it had logged. W&B keeps the
first row of a step and drops later ones, and an offline writer killed with its job loses what it
had not flushed yet (seen here: a killed job's whole segment left as a bare 7-byte header). So the
Reporter asks where the run's history really ends, re-sends the steps after that from
metrics.jsonl, and logs live steps only past it: every step reaches W&B exactly once.

    last = last_wandb_step(run, RUN_DIR / "wandb", offline=True)

Online, wandb-core tells (`run.starting_step` = the server's last step + 1). Offline it knows
nothing, so the earlier `offline-run-*-<id>/run-<id>.wandb` files are read: a leveldb-style record
log of `wandb_internal_pb2.Record` protos (wandb 0.31 writes it from Go and ships no Python
reader; tests/wandb_offline.py reads whole runs back with the same framing).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# Framing (wandb-core's fork of goleveldb's record format, same as the old Python datastore):
# a 7-byte file header "<4sHB" = (b":W&B", 0xBEE1, version 0), then 32 KiB blocks of chunks,
# each with a 7-byte header "<IHB" = (crc, length, type). A record is one FULL chunk or
# FIRST, MIDDLE..., LAST chunks. A block tail shorter than a chunk header is zero padding.
# crc = zlib.crc32(data, seed=zlib.crc32(bytes([type]))), checked against 0.31's own files.
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
BLOCK_LEN = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(wandb_file: Path) -> list:
    """All `Record` protos of one `.wandb` file; a torn tail (crashed writer) is dropped.

    ValueError if the file is not a W&B record log."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(wandb_file).read_bytes()
    if len(data) < HEADER.size or HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        raise ValueError(f"{wandb_file} is not a W&B record log (bad header)")
    records, pending, pos = [], None, HEADER.size
    while pos + CHUNK.size <= len(data):
        if BLOCK_LEN - pos % BLOCK_LEN < CHUNK.size:  # zero padding at a block's end
            pos += BLOCK_LEN - pos % BLOCK_LEN
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        chunk = data[pos + CHUNK.size : pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind == 0 and length == 0:  # preallocated zeros after the last record
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break  # torn or corrupt tail: keep what was read so far
        if kind == FULL:
            pending, payload = None, chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += chunk
            if kind == MIDDLE:
                continue
            payload, pending = pending, None
        else:
            break
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def last_offline_step(wandb_dir: Path, run_id: str) -> int:
    """The highest history step in the offline segments of `run_id` under wandb_dir (0: none)."""
    steps = [0]
    for path in Path(wandb_dir).glob(f"offline-run-*/run-{run_id}.wandb"):
        try:
            records = read_records(path)
        except (OSError, ValueError):  # unreadable: nothing of it can reach W&B either
            continue
        steps += [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    return max(steps)


def last_wandb_step(run, wandb_dir: Path, offline: bool) -> int:
    """Last step the wandb Run `run` already holds (0: none)."""
    held = max(int(run.starting_step) - 1, 0)
    return max(held, last_offline_step(wandb_dir, run.id)) if offline else held
