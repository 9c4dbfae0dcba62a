"""`accelerate launch` or `torchrun`, with failures that read like shardtrain's own.

    python -m shardtrain.launch accelerate [accelerate launch options] -m shardtrain train ...
    python -m shardtrain.launch torchrun [torchrun options] -m shardtrain train ...

Both run torch elastic's agent, which ends every failed run with a ChildFailedError traceback and
a summary block, and exits 1 whatever its workers returned. This module runs the same launcher in
this process (same options, same behaviour otherwise) and instead:
- prints nothing more for a worker that exited with a code: shardtrain printed its one line;
- prints one line when the first worker to fail was killed by a signal (it could not say
  anything itself), e.g.
  `shardtrain: rank 1 (pid 4242 on n2) was killed by SIGKILL (out of memory?)`;
- exits with the workers' code (the first failure's: 2 user error, 3 non-finite loss, 4 a peer
  died, 75 preempted, ...; 128+N for signal N), so that scripts and SLURM can branch on it.
launch/train.sh and slurm/train.sbatch use it.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

USAGE = "usage: python -m shardtrain.launch accelerate|torchrun [launcher options] ..."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("accelerate", "torchrun"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    import torch.distributed.run  # noqa: F401 - creates the agent's loggers, quieted below
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    run = run_accelerate if argv[0] == "accelerate" else run_torchrun
    quiet_agent_logs()
    try:
        run(argv[1:])
    except ChildFailedError as e:
        raise SystemExit(report(e)) from None
    except SignalException as e:  # the agent itself got SIGTERM/SIGINT and stopped its workers
        raise SystemExit(128 + int(e.sigval)) from None


def run_accelerate(args: list[str]) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(args))


def run_torchrun(args: list[str]) -> None:
    from torch.distributed.run import parse_args, run

    run(parse_args(args))


def report(error) -> int:
    """The exit code for the job, and one line when the first worker to fail died of a signal
    (the others are often the agent's own SIGTERM to the rest: not news)."""
    rank, first = error.get_first_failure()
    if first.exitcode >= 0:
        return first.exitcode
    name = signal.Signals(-first.exitcode).name
    hint = " (out of memory?)" if name == "SIGKILL" else ""
    print(f"shardtrain: rank {rank} (pid {first.pid} on {socket.gethostname()}) was killed by "
          f"{name}{hint}", file=sys.stderr, flush=True)  # the agent runs beside its workers
    return 128 - first.exitcode


def quiet_agent_logs() -> None:
    """The agent logs every failed worker at ERROR level before raising: that is the noise."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()
