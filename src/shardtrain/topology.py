"""Where this process sits in the job: SLURM's one-task-per-device launches, and loader workers.

Launchers such as torchrun and `accelerate launch` tell each process its place through
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Lightning and submitit users launch the other
way, one srun task per device inside an allocation:

    srun --nodes=2 --ntasks-per-node=4 python -m shardtrain train --recipe R --data D --out O

There no launcher sets those variables, and every task would train alone as a world-size-1 run
writing into the same folder. `apply_slurm_topology()` derives them from SLURM_PROCID,
SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_STEP_TASKS_PER_NODE and the step's node list (the
first node hosts the rendezvous), or refuses in one line when they cannot be derived.

`default_workers()` is what `data.workers=-1` (the default) becomes: the CPUs this process may use
(os.sched_getaffinity, which follows SLURM's --cpus-per-task binding and cgroups) divided among the
ranks that share them, minus one for the rank itself, so that ranks and their loader workers never
ask for more cores than the job was given.
"""

from __future__ import annotations

import os
import re
import zlib

from shardtrain.errors import UserError

SRUN_PER_TASK = "SHARDTRAIN_SRUN_PER_TASK"  # set by apply_slurm_topology for default_workers
MAX_DEFAULT_WORKERS = 8  # beyond this a rank's loader rarely gains, but memory keeps growing


def apply_slurm_topology(env: dict | None = None) -> str:
    """Inside a multi-task srun step without a launcher: set the launcher variables in `env`
    (default os.environ) and return a one-line description; otherwise change nothing, return ""."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_STEP_ID" not in env:  # a launcher ran us, or not inside srun
        return ""
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks == "1":
        return ""
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID") if k not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    if missing or not tasks or not nodelist or not per_node:
        absent = missing + [k for k, v in (("SLURM_STEP_NUM_TASKS", tasks),
                                           ("SLURM_STEP_NODELIST", nodelist),
                                           ("SLURM_STEP_TASKS_PER_NODE", per_node)) if not v]
        raise UserError(f"srun started this task without a launcher, but the job topology "
                        f"cannot be derived ({', '.join(absent)} not set): launch with "
                        f"slurm/train.sbatch, torchrun or accelerate launch instead")
    try:
        counts = tasks_per_node(per_node)
        local_world = counts[int(env["SLURM_NODEID"])]
        master = first_host(nodelist)
    except (ValueError, IndexError):
        raise UserError(f"cannot derive the job topology from SLURM_STEP_NODELIST={nodelist!r} "
                        f"and SLURM_STEP_TASKS_PER_NODE={per_node!r}: launch with "
                        f"slurm/train.sbatch, torchrun or accelerate launch instead") from None
    if sum(counts) != int(tasks) or int(env["SLURM_LOCALID"]) >= local_world:
        raise UserError(f"SLURM_STEP_TASKS_PER_NODE={per_node!r} does not match {tasks} tasks "
                        f"with local task {env['SLURM_LOCALID']} on node {env['SLURM_NODEID']}: "
                        f"cannot derive the job topology")
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env["SLURM_LOCALID"], WORLD_SIZE=tasks,
               LOCAL_WORLD_SIZE=str(local_world), GROUP_RANK=env["SLURM_NODEID"])
    env.setdefault("MASTER_ADDR", master)
    env.setdefault("MASTER_PORT", str(rendezvous_port(env)))
    env[SRUN_PER_TASK] = "1"
    check_devices(int(env["LOCAL_RANK"]), local_world)
    return (f"srun topology: rank {env['RANK']} of {tasks} (local {env['LOCAL_RANK']} of "
            f"{local_world}, {len(counts)} nodes), rendezvous {env['MASTER_ADDR']}:"
            f"{env['MASTER_PORT']}")


def check_devices(local_rank: int, local_world: int) -> None:
    """accelerate puts local rank r on cuda:r: each task must see every GPU of its node."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible and local_rank >= visible:
        raise UserError(f"srun task with local rank {local_rank} sees {visible} GPU(s) for "
                        f"{local_world} tasks on this node: give the tasks every GPU of the node "
                        f"(--gpus-per-node, no --gpus-per-task or --gpu-bind)")


def rendezvous_port(env: dict) -> int:
    """The same port on every task of a step; another one for the next step or requeue."""
    key = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}." \
          f"{env.get('SLURM_RESTART_COUNT', '0')}"
    return 20000 + zlib.crc32(key.encode()) % 20000


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts, one per node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(spec)
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu-[07-09,12],cpu1' -> 'gpu-07' (zero padding kept).

    This is all the rendezvous needs (`scontrol show hostnames` would expand them all, but it is
    not installed everywhere srun tasks run, e.g. in containers)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(nodelist)
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    if not first.isdigit():
        raise ValueError(nodelist)
    return prefix + first


def default_workers(env: dict | None = None) -> int:
    """Loader workers per rank when data.workers=-1: this process's CPUs / the ranks sharing them
    - 1 (the rank itself), between 0 and MAX_DEFAULT_WORKERS."""
    env = os.environ if env is None else env
    cpus = len(os.sched_getaffinity(0))
    sharing = int(env.get("LOCAL_WORLD_SIZE", 1))
    per_task = int(env.get("SLURM_CPUS_PER_TASK", 0) or 0)
    if env.get(SRUN_PER_TASK) and per_task:
        # one srun task per rank: with CPU binding each task already sees only its own share
        # (cpus == per_task); without binding it sees the node's CPUs, shared by the local tasks
        sharing = max(1, min(sharing, cpus // per_task))
    return max(0, min(cpus // max(sharing, 1) - 1, MAX_DEFAULT_WORKERS))
