"""evaluate.py on 2 real processes: `ranks_identical` is a bitwise comparison.

The processes come from accelerate's `debug_launcher` (fork, gloo on CPU, a file rendezvous),
as in Accelerate's tests/test_cpu.py.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState, PartialState

from shardtrain.evaluate import ranks_identical, state_digest


def fresh_accelerator() -> Accelerator:
    """An Accelerator of the forked world: the parent's (world size 1) state is a class-level
    singleton that fork copies, so forget it first."""
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    return Accelerator(cpu=True)


def differ_on_rank_1(rank: int) -> dict[str, tuple[dict, dict]]:
    """Pairs (rank 0's state, rank 1's state) that a sum/abs-sum fingerprint calls equal."""
    w = torch.tensor([[0.5, -1.25], [2.0, 3.0]])
    base = {"w": w, "bn.num_batches_tracked": torch.tensor(7), "b": torch.zeros(2)}
    return {
        "permuted values": dict(base, w=w.flip(1) if rank else w),  # same sum, same abs sum
        "negative zero": dict(base, b=-base["b"] if rank else base["b"]),
        "integer buffer": dict(base, **{"bn.num_batches_tracked": torch.tensor(7 + rank)}),
        "dtype": dict(base, w=w.to(torch.bfloat16) if rank else w.to(torch.float16)),
        "one bit": dict(base, w=w + (torch.nextafter(w, w + 1) - w) * (rank * (w == 3.0))),
    }


def check_ranks_identical() -> None:
    acc = fresh_accelerator()
    assert acc.num_processes == 2
    rank = acc.process_index
    same = {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3), "h": torch.ones(2).half()}
    assert ranks_identical(same, acc) is True
    for what, state in differ_on_rank_1(rank).items():
        assert ranks_identical(state, acc) is False, what
    acc.wait_for_everyone()


def test_ranks_identical_compares_every_bit_on_two_processes():
    debug_launcher(check_ranks_identical, num_processes=2)


def test_state_digest_is_bitwise_and_ignores_key_order():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(1)}
    assert state_digest(a) == state_digest({"y": torch.tensor(1), "x": torch.tensor([1.0, 2.0])})
    for rank0, rank1 in zip(differ_on_rank_1(0).values(), differ_on_rank_1(1).values()):
        assert state_digest(rank0) != state_digest(rank1)
