"""One writer per run folder: an exclusive lock on RUN_DIR/.shardtrain.lock for the life of a run.

Two jobs writing the same --out (a double submission, a requeue racing a manual restart) would
interleave checkpoints and metrics. The main process of a run takes the lock before anything is
written and holds it until it exits; a second writer is refused at once (UserError, exit 2)
with the holder's host, pid, SLURM job and start time, which the holder writes into the file.

Why fcntl (POSIX record) locks and not a lease file or flock():
- the kernel drops the lock when the holding process dies, however it dies (kill -9, OOM), so a
  requeued or resubmitted job takes over a dead run's folder with no staleness guess;
- POSIX locks are the ones network filesystems make cluster-wide: NFSv3 (lockd) and v4, GPFS,
  Lustre mounted with `-o flock`, BeeGFS, CephFS. flock() is emulated with them on Linux NFS but is
  node-local on some others. On a filesystem without cluster-wide locks (Lustre `-o localflock`)
  two writers on different nodes are not detected.
- POSIX locks are per process and dropped when the process closes ANY descriptor of the file, so
  only this module opens the lock file, once, and keeps the descriptor for the whole run.
- A lock held by a node that vanished is released by the NFS server when the node's lease expires
  (NFSv4: ~90 s). A requeued job that finds its own previous incarnation (same SLURM job id, lower
  restart count) as the holder therefore waits up to `wait_for_predecessor` seconds instead of
  being refused.

The file itself is never deleted (deleting a lock file races with a process locking it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from shardtrain.errors import UserError

LOCK_NAME = ".shardtrain.lock"


def holder_info() -> dict:
    """Who holds the lock: recorded in the lock file for the message a second writer gets."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLock:
    """The held lock; release() (or process exit) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the POSIX lock
            self.fd = -1


def lock_run_folder(run_dir: Path, wait_for_predecessor: float = 120.0) -> RunLock:
    """Lock run_dir for this process or raise UserError naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_for_predecessor
    while not try_lock(fd):
        holder = read_holder(fd)
        if not (is_predecessor(holder) and time.monotonic() < deadline):
            os.close(fd)
            raise UserError(f"run folder {run_dir} is in use by {describe(holder)} "
                            f"(lock: {path}): wait for that run to end, or choose another --out")
        time.sleep(2)
    info = json.dumps(holder_info()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    os.fsync(fd)
    return RunLock(path, fd)


def try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder is writing it right now
        return {}


def is_predecessor(holder: dict) -> bool:
    """The holder is this job's previous incarnation (SLURM requeue): it is dead or dying."""
    job = os.environ.get("SLURM_JOB_ID", "")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    return bool(job) and holder.get("slurm_job_id") == job and \
        int(holder.get("slurm_restart", 0)) < restart


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it has not recorded itself yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, "
            f"running since {holder.get('started')}")


def lock_for_run(run_dir: Path, accelerator) -> RunLock | None:
    """The main process takes the lock; every rank learns the outcome, so that a refused job
    ends on all ranks at once (exit 2) instead of leaving the others waiting in a collective."""
    lock, refusal = None, ""
    if accelerator.is_main_process:
        try:
            lock = lock_run_folder(run_dir)
        except UserError as e:
            refusal = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UserError(refusal)
    return lock
