"""train(cfg): shards -> trained, evaluated model in RUN_DIR. With loop.py, knows about ranks.

Run on one process:
    shardtrain train --recipe fashion-mnist-resnet9 --data shards/fashion-mnist-12k --out runs/x
On 2 CPU processes (launch/README.md: plain `--cpu --num_processes 2` silently starts one):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no -m shardtrain train --recipe ... --data ...
On all GPUs of a node: accelerate launch --config_file launch/gpus.yaml -m shardtrain train ...

Reads top to bottom: setup -> data -> model -> optimizer/schedule -> resume -> prepare -> steps
-> final eval -> end_training. Counting is in optimizer steps; the epoch plan (data/plan.py) gives
every rank the same number of steps. On SIGUSR1/SIGTERM every rank finishes the current step,
a checkpoint is written and the process exits with ExitCode.PREEMPTED (75) for the job to requeue.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from shardtrain import __version__
from shardtrain.checkpoint import latest_checkpoint, load_checkpoint, refuse_existing_run
from shardtrain.config import Config, config_changes, save_config
from shardtrain.data.batch import BatchOptions
from shardtrain.data.cache import ShardCache, default_cache_dir
from shardtrain.data.index import Index, SampleTable, load_index, sample_table
from shardtrain.data.plan import TrainPlan, check_batch_layout, check_node_layout
from shardtrain.data.remote import Retry
from shardtrain.ema import make_ema, split_ema
from shardtrain.errors import ExitCode, UserError
from shardtrain.loop import Loop
from shardtrain.lr_plateau import PlateauLR
from shardtrain.models import create_model
from shardtrain.optim import make_optimizer, make_scheduler, param_groups
from shardtrain.runlock import lock_for_run
from shardtrain.step import State, plain_module
from shardtrain.tracking.report import Reporter


def resolve_precision(precision: str, cuda: bool) -> str:
    """`auto`: bf16 where the hardware has it (Ampere+ GPUs; CPUs with AVX512-BF16 or AMX, where
    bench/trainer_overhead.py measures ResNet9 ~1.9x faster than fp32), fp16 on older GPUs,
    else fp32 (`no`). The resolved value is what W&B records as `precision`."""
    if precision != "auto":
        return precision
    if cuda:
        return "bf16" if gpu_has_native_bf16() else "fp16"
    native = [getattr(torch.cpu, f, lambda: False)()
              for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "no"


def gpu_has_native_bf16() -> bool:
    """Whether this rank's GPU (LOCAL_RANK) computes bf16 natively: compute capability 8+.

    Not torch.cuda.is_bf16_supported(): it asks the current device, which is GPU 0 on every
    rank before accelerate sets the device, and by default it counts emulation (V100/T4 say
    True, then run bf16 several times slower than fp16), which it tests by allocating on
    GPU 0. Reading the device properties creates no CUDA context."""
    if torch.version.hip:
        return True  # every ROCm GPU torch supports has bf16
    index = int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1)
    return torch.cuda.get_device_properties(index).major >= 8


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision, cuda)
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU (on CPU it would silently train "
                        "in fp32); use train.precision=bf16, auto or no")
    accelerator = Accelerator(
        cpu=not cuda, mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="wandb" if cfg.log.wandb else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout)),
            # a frozen transfer backbone produces no grads: DDP must not wait for them
            DistributedDataParallelKwargs(find_unused_parameters=cfg.model.freeze_epochs > 0),
        ])
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise RuntimeError(f"accelerate started {accelerator.num_processes} process(es) but "
                           f"WORLD_SIZE={expected}: check the launch flags (see launch/README.md)")
    return accelerator


@dataclass
class Data:
    """The dataset as the trainer sees it: index, tables, plan and batch options."""

    index: Index
    index_json: bytes  # index.json's bytes, uploaded as such by the W&B dataset artifact
    index_hash: str  # their sha256: identifies the dataset version in checkpoints and W&B
    train: SampleTable
    val: SampleTable | None  # None: no such split (or data.val_split="")
    test: SampleTable | None
    plan: TrainPlan
    image_size: int
    batch_opts: BatchOptions


def setup_data(cfg: Config, accelerator: Accelerator, ckpt: dict | None = None) -> Data:
    """Index, tables and plan; a resumed run keeps its checkpoint's canonical nodes."""
    if not cfg.data.path:
        raise UserError("no dataset: pass --data DIR (a folder written by `shardtrain pack`)")
    index = load_index(cfg.data.path)
    index_json = index.json_bytes  # read once, by load_index
    check, cache = cfg.data.verify_checksums, shard_cache(cfg)
    train = sample_table(index, cfg.data.train_split, check, cache)
    val, test = (sample_table(index, name, check, cache) if has_split(index, name) else None
                 for name in (cfg.data.val_split, cfg.data.test_split))
    for table in (t for t in (train, val, test) if t is not None and t.remote):
        table.remote.prefetch_shards = cfg.data.prefetch_shards
    for damaged in (t.damaged for t in (train, val, test) if t is not None):
        for line in damaged:
            accelerator.print(f"warning: {line}: reading it up to the damage")
    nodes = num_nodes(accelerator)
    if cfg.data.partition == "node" and not cfg.data.canonical_nodes:
        saved = ckpt["trainer"]["config"]["data"].get("canonical_nodes", 0) if ckpt else 0
        cfg.data.canonical_nodes = saved or nodes  # recorded in config.yaml and each checkpoint
    try:
        check_batch_layout(cfg.data.batch_size, accelerator.num_processes, cfg.train.grad_accum,
                           len(train.label))
        if cfg.data.partition == "node":
            check_node_layout(cfg.data.batch_size, nodes, cfg.data.canonical_nodes,
                              len(train.label))
    except ValueError as e:
        raise UserError(str(e)) from None
    plan = TrainPlan(tuple(s["num_samples"] for s in index.split(cfg.data.train_split).shards),
                     cfg.data.batch_size, accelerator.num_processes, accelerator.process_index,
                     cfg.train.grad_accum, cfg.train.seed, cfg.data.shuffle_window,
                     cfg.data.partition, max(cfg.data.canonical_nodes, 1), nodes)
    image_size = cfg.data.image_size or (max(index.image_size) if index.image_size else 0)
    if not image_size:
        raise UserError("images in this dataset vary in size: set data.image_size")
    mean = torch.tensor(cfg.data.mean or index.mean, dtype=torch.float32)
    std = torch.tensor(cfg.data.std or index.std, dtype=torch.float32)
    opts = BatchOptions(mean, std, cfg.data.scaling, cfg.augment.pad_crop, cfg.model.channels_last)
    return Data(index, index_json, hashlib.sha256(index_json).hexdigest(), train, val, test, plan,
                image_size, opts)


def num_nodes(accelerator: Accelerator) -> int:
    """Nodes of this launch: torchrun/accelerate say how many processes share a node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if per_node < 1 or accelerator.num_processes % per_node:
        raise RuntimeError(f"LOCAL_WORLD_SIZE={per_node} does not divide the "
                           f"{accelerator.num_processes} processes")
    return accelerator.num_processes // per_node


def shard_cache(cfg: Config) -> ShardCache:
    """The node-local cache that shards behind URLs are read through (data/cache.py)."""
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    return ShardCache(root, cfg.data.cache_limit,
                      Retry(max(cfg.data.retries, 1), cfg.data.retry_delay))


def has_split(index, name: str) -> bool:
    return bool(name) and name in index.splits


def build_model(cfg: Config, index: Index, image_size: int) -> tuple[torch.nn.Module, dict]:
    """The model and the metadata that makes its weights file self-describing."""
    kwargs = {k: v for k, v in asdict(cfg.model).items()
              if k not in ("name", "freeze_epochs", "channels_last", "sync_bn")}
    kwargs["image_size"] = image_size
    try:
        model = create_model(cfg.model.name, len(index.classes), index.channels, **kwargs)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise UserError(f"model.name={cfg.model.name}: {e}") from None
    # the weights file holds the whole trained network: loading it must not read (or download)
    # the pretrained backbone again, so the metadata says to build the model without it
    saved_kwargs = {**kwargs, "pretrained": ""}
    meta = {"model": cfg.model.name, "model_kwargs": saved_kwargs, "classes": index.classes,
            "channels": index.channels, "image_size": image_size,
            "mean": list(cfg.data.mean or index.mean), "std": list(cfg.data.std or index.std),
            "scaling": cfg.data.scaling, "shardtrain": __version__}
    return model, meta


def train(cfg: Config, out_dir: Path, resume: str = "", allow_changes: bool = False) -> dict:
    """Train `cfg` into out_dir; returns the final metrics (also in out_dir/final.json)."""
    if not resume:  # before any rank can write (the process group forms in make_accelerator)
        refuse_existing_run(out_dir)
    accelerator = make_accelerator(cfg)
    lock_for_run(out_dir, accelerator)  # one writer per run folder, until this process exits
    ckpt = find_resume(resume, out_dir)
    data = setup_data(cfg, accelerator, ckpt)
    total_steps = resolve_total_steps(cfg, data.plan)
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model, meta = build_model(cfg, data.index, data.image_size)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.sync_bn and torch.cuda.is_available():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.model.sync_bn:  # SyncBatchNorm inside DDP on CPU raises
        accelerator.print("model.sync_bn=true is ignored on CPU (SyncBatchNorm needs CUDA): each "
                          "process normalises with its own batch statistics")
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.head_lr_mult)
    o = cfg.optim
    optimizer = make_optimizer(o.name, groups, o.max_lr, o.momentum, o.nesterov, tuple(o.betas))
    # not passed to prepare(): a prepared scheduler steps num_processes times per step
    if o.schedule == "plateau":
        scheduler = make_plateau_scheduler(optimizer, o, has_val=data.val is not None)
    else:
        scheduler = make_scheduler(optimizer, o.max_lr, total_steps, o.schedule, o.warmup_frac,
                                   o.div_factor, o.final_div_factor)
    state = State()
    if ckpt:
        state = restore(ckpt, cfg, data, model, optimizer, scheduler, accelerator, allow_changes)
        if o.schedule != "plateau":  # a longer/shorter run: see optim.StepSchedule
            scheduler.lr_lambdas[0].extend(state.step, total_steps)
    torch.manual_seed(cfg.train.seed * 1000 + accelerator.process_index + 1 + state.step)
    if ckpt and "rng" in ckpt:
        restore_rng(ckpt, accelerator)
    if cfg.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = make_ema(plain_module(accelerator, model), cfg.train.ema_decay, cfg.train.ema_warmup,
                   ckpt["model"] if ckpt else None)  # None unless train.ema_decay > 0
    if ckpt and accelerator.scaler is not None and ckpt["optim"].get("scaler"):
        accelerator.scaler.load_state_dict(ckpt["optim"]["scaler"])
    reporter = Reporter(accelerator, out_dir, total_steps, state.step)
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    state.wandb_id = reporter.start_wandb(cfg, run_config(cfg, data, accelerator), state.wandb_id,
                                          data)
    loop = Loop(cfg, accelerator, data, model, optimizer, scheduler, total_steps=total_steps,
                reporter=reporter, meta=meta, out_dir=out_dir, ema=ema)
    preempted = loop.run(state)
    if preempted:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        raise SystemExit(ExitCode.PREEMPTED)
    return loop.finish(state)


def make_plateau_scheduler(optimizer, o, has_val: bool) -> PlateauLR:
    """optim.schedule=plateau: cut the lr when the validation loss stops improving."""
    if not has_val:
        raise UserError("optim.schedule=plateau steps on the validation loss: the data needs a "
                        "val split (data.val_split)")
    return PlateauLR(optimizer, o.max_lr, factor=o.plateau_factor, patience=o.plateau_patience,
                     threshold=o.plateau_threshold, min_lr=o.min_lr)


def resolve_total_steps(cfg: Config, plan: TrainPlan) -> int:
    total = plan.steps_per_epoch * cfg.train.epochs
    return cfg.train.max_steps if cfg.train.max_steps > 0 else total


def run_config(cfg: Config, data: Data, accelerator: Accelerator) -> dict:
    """The W&B config: resolved config plus what the run really ran on."""
    import accelerate

    nodes = int(os.environ.get("SHARDTRAIN_NUM_NODES", os.environ.get("SLURM_NNODES", 1)))
    return {**asdict(cfg), "world_size": accelerator.num_processes,
            "procs_per_node": accelerator.num_processes // max(nodes, 1),
            "precision": accelerator.mixed_precision, "index_hash": data.index_hash,
            "classes": data.index.classes, "git_commit": git_commit(),
            "torch": torch.__version__, "accelerate": accelerate.__version__,
            "steps_per_epoch": data.plan.steps_per_epoch}


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def find_resume(resume: str, out_dir: Path) -> dict | None:
    if not resume:
        return None
    if resume == "auto":  # strict: never restart from 0 over a damaged run
        folder = latest_checkpoint(out_dir / "checkpoints", strict=True)
        return load_checkpoint(folder) if folder else None
    path = Path(resume)
    folder = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    if not folder or not (folder / "trainer.json").is_file():
        raise UserError(f"--resume {resume}: no checkpoint there")
    return load_checkpoint(folder)


def restore(ckpt: dict, cfg: Config, data: Data, model, optimizer, scheduler, accelerator,
            allow_changes: bool) -> State:
    """Load a checkpoint into the (unprepared) model and optimizer, after compatibility checks."""
    t = ckpt["trainer"]
    problems = []
    if t["index_hash"] != data.index_hash:
        problems.append("the dataset index differs from the checkpoint's")
    changes = config_changes(t["config"], cfg)
    if changes:
        problems.append(f"the config differs from the checkpoint's: {', '.join(changes[:4])}")
    if ckpt["meta"].get("classes") != data.index.classes:
        raise UserError("cannot resume: the dataset's classes differ from the checkpoint's")
    if problems and not allow_changes:
        raise UserError(f"cannot resume: {'; '.join(problems)} (--allow-changes to force)")
    try:
        model.load_state_dict(split_ema(ckpt["model"])[0])  # EMA tensors: see make_ema
    except RuntimeError as e:
        raise UserError(f"cannot resume: model shape differs from the checkpoint's: "
                        f"{str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(ckpt["optim"]["optimizer"])
    scheduler.load_state_dict(ckpt["optim"]["scheduler"])
    accelerator.print(f"resumed from step {t['step']} ({t['world_size']} -> "
                      f"{accelerator.num_processes} processes)")
    state = State(**t["state"])
    if accelerator.process_index > 0:  # the checkpoint holds the sums over all ranks: once
        state = replace(state, skipped_samples=0, skipped_micro_batches=0, skipped_examples=[])
    return state


def restore_rng(ckpt: dict, accelerator) -> None:
    states = ckpt["rng"]
    if len(states) == accelerator.num_processes:  # else: fresh per-rank seeds, not bitwise
        mine = states[accelerator.process_index]
        torch.set_rng_state(mine["cpu"])
        if torch.cuda.is_available() and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"])

