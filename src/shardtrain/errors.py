"""Every exit code of `shardtrain`, and the errors that map to them.

A user mistake or bad data is one line on stderr and a non-zero exit, never a traceback; bugs
keep their traceback. The codes are what launch scripts and SLURM branch on:

    0    OK            the command did what it was asked
    1    DATA_ERROR    corrupt or missing shards, a failed download, a failed write (disk full)
    2    USAGE         a bad command line, recipe, key, path or dataset choice (UserError)
    3    NON_FINITE    non-finite loss or weights stopped training; the last checkpoint predates it
    4    PEER_FAILED   another rank or node died (or failed); this one stopped at once instead of
                       waiting in a collective: run again with the same --out to resume
    75   PREEMPTED     EX_TEMPFAIL: checkpointed on SIGUSR1/SIGTERM; slurm/train.sbatch requeues
    130  INTERRUPTED   Ctrl-C (128 + SIGINT)
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    DATA_ERROR = 1
    USAGE = 2
    NON_FINITE = 3
    PEER_FAILED = 4
    PREEMPTED = 75
    INTERRUPTED = 130


class UserError(Exception):
    """A bad command line, recipe, key, path or dataset: shown without a traceback."""

    exit_code = ExitCode.USAGE


class DataError(UserError):
    """Corrupt or inconsistent shards/index, or data that cannot be read or written."""

    exit_code = ExitCode.DATA_ERROR


class NonFiniteLoss(UserError):
    """The loss (or the weights to checkpoint) became NaN/inf: the run stops without
    checkpointing past it."""

    exit_code = ExitCode.NON_FINITE
