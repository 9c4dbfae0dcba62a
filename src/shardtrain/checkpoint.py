"""Save and load complete training state atomically; weights files that describe themselves.

Layout of RUN_DIR/checkpoints/:
    step-000120/model.safetensors   weights + metadata (model name/kwargs, classes, normalisation)
    step-000120/optimizer.pt        optimizer, scheduler and grad-scaler state (tensors only)
    step-000120/rng.pt              every rank's torch RNG states
    step-000120/trainer.json        step, epoch, world size, W&B id, config and index hashes
    latest                          text: the newest complete checkpoint's folder name
    best.safetensors                weights with the best validation accuracy so far

A checkpoint is written into a temporary folder, fsynced and renamed, then `latest` is replaced:
a crash while saving leaves the previous checkpoint loadable. A write that fails (disk full,
quota, I/O error) removes the partial files and raises DataError (exit 1) naming the path; the
previous checkpoint stays what `latest` names. Nothing here unpickles code:
weights are safetensors and the rest loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from shardtrain.errors import DataError, UserError

# what a failed write raises: OSError (ENOSPC, EDQUOT, EIO), SafetensorError("... No space left
# on device (os error 28)"), and torch.save's RuntimeError("[enforce fail at inline_container.cc]
# unexpected pos ...") on a full disk. Any other RuntimeError (a bug, an unpicklable object) is
# not a write failure and keeps its traceback.
TORCH_WRITER_ERRORS = ("inline_container", "PytorchStreamWriter", "file write failed")


def is_write_failure(error: BaseException) -> bool:
    if isinstance(error, (OSError, SafetensorError, WriteFailed)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in TORCH_WRITER_ERRORS)


class WriteFailed(DataError):
    """A file could not be written (exit 1); `reason` says why without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path}: {reason}")
        self.reason = reason

META_KEY = "shardtrain"


def save_weights(path: Path, state_dict: dict, meta: dict) -> None:
    """Atomically write a safetensors file with our metadata (JSON under the 'shardtrain' key)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if not is_write_failure(e):
            raise
        raise WriteFailed(path, write_failure(e, path.parent)) from None


def load_weights(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, metadata) from a .safetensors file, a checkpoint folder or a run folder."""
    path = resolve_weights(Path(path))
    meta = read_meta(path)
    if not meta:
        raise UserError(f"{path} has no shardtrain metadata (was it written by shardtrain?)")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta


def read_meta(path: Path) -> dict:
    """The metadata save_weights stored in a .safetensors file ({} when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(META_KEY, "{}"))


def resolve_weights(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / "model.safetensors", path / "checkpoints" / "best.safetensors"):
            if candidate.is_file():
                return candidate
        latest = latest_checkpoint(path / "checkpoints")
        if latest:
            return latest / "model.safetensors"
        raise UserError(f"no model.safetensors in {path}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def save_checkpoint(root: Path, step: int, **parts) -> Path:
    """write_checkpoint(); a failed write removes what it left and raises DataError naming the
    checkpoint, while `latest` still names the previous complete checkpoint."""
    try:
        return write_checkpoint(root, step, **parts)
    except Exception as e:  # a failed write or a bug: leave no partial files either way
        for partial in root.glob(f".*.tmp-{os.getpid()}"):  # .step-N.tmp-PID, .latest.tmp-PID
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        if not is_write_failure(e):
            raise
        previous = latest_checkpoint(root)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        reason = e.reason if isinstance(e, WriteFailed) else write_failure(e, root)
        raise WriteFailed(root / f"step-{step:06d}", reason + kept) from None


def write_failure(error: Exception, folder: Path) -> str:
    """The error's first line and the free space left where it was writing."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if "inline_container" in text:  # torch.save's zip writer on a full disk or quota
        text = f"torch.save stopped mid-file ({text.splitlines()[0].strip()})"
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"{text.splitlines()[0] if text else type(error).__name__} ({free})"


def write_checkpoint(root: Path, step: int, *, model_state: dict, meta: dict, optim_state: dict,
                     rng_states: list, trainer: dict, keep: int) -> Path:
    """Write checkpoint `step` under root atomically, point `latest` at it, prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", model_state, meta)
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    for f in tmp.iterdir():
        fsync_file(f)
    if final.exists():  # re-saving the same step (e.g. epoch end right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomic(root / "latest", name)
    prune(root, keep, newest=final)
    return final


def refuse_existing_run(out_dir: Path) -> None:
    """UserError when out_dir already holds a run: training into it without --resume would
    prune its checkpoints and rewrite its metrics."""
    found = [n for n in ("checkpoints", "metrics.jsonl", "final.json") if (out_dir / n).exists()]
    if found:
        raise UserError(f"{out_dir} already holds a run ({found[0]}): continue it with "
                        f"--resume auto, or train into a new --out folder")


def latest_checkpoint(root: Path, strict: bool = False) -> Path | None:
    """The complete checkpoint `root/latest` names; None without one, or when it names a missing
    or incomplete folder, which `strict` refuses instead (DataError)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    if (folder / "trainer.json").is_file():
        return folder
    if strict:
        raise DataError(f"{pointer} names {name!r}, which is missing or incomplete: resume from "
                        f"another checkpoint with --resume PATH")
    return None


def load_checkpoint(folder: Path) -> dict:
    """Everything save_checkpoint wrote, loaded without executing pickled code."""
    state, meta = load_weights(folder / "model.safetensors")
    return {
        "model": state,
        "meta": meta,
        "optim": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        "rng": torch.load(folder / "rng.pt", map_location="cpu", weights_only=True),
        "trainer": json.loads((folder / "trainer.json").read_text()),
    }


def prune(root: Path, keep: int, newest: Path) -> None:
    """Keep `newest` (just written, what `latest` names) and the keep-1 highest other steps.

    By step number, not by name: names sort wrongly past step 999,999, and a folder left by
    an older run may hold higher step numbers than the checkpoint just written."""
    steps = sorted((int(p.name[5:]), p.name) for p in root.glob("step-*")
                   if p.is_dir() and p.name[5:].isdigit())
    others = [root / name for _, name in steps if name != newest.name]
    for old in others[:max(len(others) - (max(keep, 1) - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a crash during an earlier save
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync_file(tmp)
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
