"""How a job learns it must stop: SIGUSR1/SIGTERM (SLURM's --signal lead time, `scancel
--signal`, a workstation's kill) set a flag; every rank agrees on it after an optimizer step, the
loop checkpoints and exits ExitCode.PREEMPTED (75), and slurm/train.sbatch requeues the job.
"""

from __future__ import annotations

import signal

import torch


class Preemption:
    """SIGUSR1/SIGTERM set a flag; the loop checks it after optimizer steps (not in here)."""

    CHECK_EVERY = 10  # optimizer steps between agreements when there are several processes

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.requested = True

    def agreed(self, accelerator, step: int) -> bool:
        """True on every rank once any rank got the signal. With several processes that takes
        a tiny all-reduce (a CPU-GPU sync), so ranks compare notes every CHECK_EVERY steps:
        seconds, well inside SLURM's --signal lead time."""
        if accelerator.num_processes == 1:
            return self.requested
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
