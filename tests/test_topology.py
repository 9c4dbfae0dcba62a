"""Where a process sits in the job: one srun task per device, and the default loader workers.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_topology.py
(the real srun launch is in tests/test_slurm.py)
"""

from __future__ import annotations

import os

import pytest

from shardtrain.errors import UserError
from shardtrain.topology import (
    apply_slurm_topology,
    default_workers,
    first_host,
    rendezvous_port,
    tasks_per_node,
)


def srun_env(procid: int, localid: int, nodeid: int, **extra) -> dict:
    """What task `procid` of `srun --nodes=2 --ntasks-per-node=2` sees (Slurm 22.05)."""
    env = {"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
           "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu-[07-08]",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu-[07-08]"}
    return {**env, **extra}


def test_srun_tasks_become_one_job_of_four_ranks():
    envs = [srun_env(p, p % 2, p // 2) for p in range(4)]
    lines = [apply_slurm_topology(env) for env in envs]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["MASTER_ADDR"] for e in envs} == {"gpu-07"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1  # every task meets at the same port
    assert "rank 3 of 4 (local 1 of 2, 2 nodes), rendezvous gpu-07:" in lines[3]


def test_a_launcher_or_a_plain_batch_shell_is_left_alone():
    launched = srun_env(1, 1, 0, RANK="5", WORLD_SIZE="16")  # torchrun/accelerate inside srun
    assert apply_slurm_topology(launched) == "" and launched["RANK"] == "5"
    batch = srun_env(0, 0, 0)  # the batch script itself: SLURM_PROCID=0 but no step
    del batch["SLURM_STEP_ID"]
    assert apply_slurm_topology(batch) == "" and "RANK" not in batch
    single = srun_env(0, 0, 0, SLURM_STEP_NUM_TASKS="1")
    assert apply_slurm_topology(single) == "" and "RANK" not in single


def test_user_set_rendezvous_is_kept():
    env = srun_env(2, 0, 1, MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")
    apply_slurm_topology(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "29400")


@pytest.mark.parametrize("broken", [
    {"SLURM_STEP_NODELIST": "", "SLURM_JOB_NODELIST": ""},
    {"SLURM_STEP_TASKS_PER_NODE": "", "SLURM_TASKS_PER_NODE": ""},
    {"SLURM_STEP_TASKS_PER_NODE": "3,1"},  # 4 tasks, but local task 1 on a node with one task
    {"SLURM_STEP_TASKS_PER_NODE": "2(x3)"},  # 6 tasks, not 4
    {"SLURM_STEP_NODELIST": "[bad"},
    {"SLURM_LOCALID": None},
])
def test_an_underivable_topology_is_refused_in_one_line(broken):
    env = {k: v for k, v in {**srun_env(3, 1, 1), **broken}.items() if v is not None}
    with pytest.raises(UserError) as e:
        apply_slurm_topology(env)
    assert "\n" not in str(e.value) and "topology" in str(e.value) and "RANK" not in env


def test_hostlists_and_task_counts():
    assert first_host("n[1-2]") == "n1"
    assert first_host("gpu-[07-09,12],cpu1") == "gpu-07"
    assert first_host("login3,n[4-5]") == "login3"
    assert first_host("a1b-[010,011]") == "a1b-010"
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        tasks_per_node("2(x)")


def test_rendezvous_port_changes_with_step_and_requeue():
    base = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}
    ports = {rendezvous_port(base), rendezvous_port({**base, "SLURM_STEP_ID": "1"}),
             rendezvous_port({**base, "SLURM_RESTART_COUNT": "1"})}
    assert len(ports) == 3 and all(20000 <= p < 40000 for p in ports)


@pytest.mark.parametrize("cpus,env,expected", [
    (16, {}, 8),  # one rank: 15 free CPUs, capped at 8
    (16, {"LOCAL_WORLD_SIZE": "4"}, 3),  # 4 ranks share 16: 4 each, 1 for the rank itself
    (2, {"LOCAL_WORLD_SIZE": "2"}, 0),  # 1 CPU per rank: load in the rank, never oversubscribe
    (2, {}, 1),
    # one srun task per rank, bound to its own 4 CPUs: they are not shared with the others
    (4, {"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "4", "SHARDTRAIN_SRUN_PER_TASK": "1"}, 3),
    # the same without CPU binding: every task sees the node's 16
    (16, {"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "4", "SHARDTRAIN_SRUN_PER_TASK": "1"},
     3),
    # slurm/train.sbatch: one task per node runs 4 ranks on its 16 CPUs
    (16, {"LOCAL_WORLD_SIZE": "4", "SLURM_CPUS_PER_TASK": "16"}, 3),
])
def test_default_workers_share_this_process_cpus(monkeypatch, cpus, env, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert default_workers(env) == expected
