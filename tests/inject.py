"""Run `shardtrain` with one fault injected, for the failure tests (nothing here ships).

    python tests/inject.py FAULT shardtrain-args...        (also as the script of a launcher)

FAULT:
    crash:R:N   rank R raises RuntimeError in its Nth loss computation (a bug on one rank)
    enospc:N    the Nth checkpoint fails as on a full disk (torch.save of its optimizer.pt)

The faults patch torch, not shardtrain, so they keep working however the trainer is arranged.
"""

from __future__ import annotations

import os
import sys

import torch


def crash(rank: int, at: int) -> None:
    forward, calls = torch.nn.CrossEntropyLoss.forward, [0]

    def failing_forward(self, *args, **kwargs):
        calls[0] += 1
        if int(os.environ.get("RANK", 0)) == rank and calls[0] == at:
            raise RuntimeError(f"injected bug on rank {rank}")
        return forward(self, *args, **kwargs)

    torch.nn.CrossEntropyLoss.forward = failing_forward


def enospc(at: int) -> None:
    save, calls = torch.save, [0]

    def failing_save(obj, f, *args, **kwargs):
        if "checkpoints" in str(f) and str(f).endswith("optimizer.pt"):
            calls[0] += 1
            if calls[0] == at:  # what torch.save raises when the disk fills mid-file
                with open(f, "wb") as partial:
                    partial.write(b"PK\x03\x04")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                   "576 vs 534")
        return save(obj, f, *args, **kwargs)

    torch.save = failing_save


if __name__ == "__main__":
    kind, *params = sys.argv[1].split(":")
    {"crash": crash, "enospc": enospc}[kind](*map(int, params))
    from shardtrain.cli import main

    main(sys.argv[2:])
