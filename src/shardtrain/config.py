"""Config: nested dataclasses filled from a recipe YAML, then from `section.key=value` overrides.

Defaults live only in the dataclass fields below; a recipe lists only what it changes.

    cfg = load_config("fashion-mnist-resnet9", ["optim.max_lr=0.02", "train.epochs=3"])

Unknown keys and wrong types raise UserError naming the key (and the closest known key); the
parsing itself is in _typed.py. RESUMABLE_CHANGES says which keys may differ on `--resume`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from shardtrain._typed import apply_overrides, check_choice, closest, flatten, from_dict, load_yaml
from shardtrain.errors import UserError


@dataclass
class DataConfig:
    path: str = ""  # shard folder or URL (http(s)://, s3://, gs://) holding index.json (--data)
    image_size: int = 0  # train/eval side length in px; 0 = the index's image size
    batch_size: int = 128  # global batch: per-device batch x processes x grad_accum
    workers: int = -1  # loader worker processes per rank; -1 = this process's CPUs (affinity,
    #                    e.g. SLURM --cpus-per-task) / ranks on the node - 1, at most 8
    prefetch: int = 4  # batches prefetched per worker
    shuffle_window: int = 4  # shards shuffled together per block (1 = within shard, 0 = all)
    verify_checksums: bool = True  # sha256 every shard before step 0 (false: read damaged
    #                                 shards up to the damage, skipping and reporting bad samples)
    train_split: str = "train"
    val_split: str = "val"  # "" = no per-epoch validation
    test_split: str = "test"  # "" = no final test evaluation
    scaling: str = "standardize"  # standardize (index mean/std) | unit ([0,1]) | none (0..255)
    mean: list[float] = field(default_factory=list)  # override the index's mean (e.g. ImageNet)
    std: list[float] = field(default_factory=list)
    partition: str = "global"  # global: all ranks read each shard window | node: each node
    #                            reads only its share of the shards per epoch (less egress)
    canonical_nodes: int = 0  # partition=node: C fixing the sample order (0 = the checkpoint's
    #                           C, else this launch's node count; resuming on P nodes needs P | C
    #                           or C | P)
    # shards behind URLs (README "Data anywhere"): read through a node-local cache
    cache_dir: str = ""  # node-local cache folder; "" = $SHARDTRAIN_CACHE or TMPDIR/shardtrain-*
    cache_limit: int = 0  # bytes the cache may hold before evicting LRU shards (0 = no limit)
    prefetch_shards: int = 8  # distinct shards kept downloaded ahead of the loader (per rank)
    retries: int = 6  # tries per download (transient faults: resets, timeouts, 5xx)
    retry_delay: float = 1.0  # seconds before the first retry, doubled each time (+-50% jitter)


@dataclass
class AugmentConfig:
    pad_crop: int = 0  # reflect-pad by this many px, then random-crop back (0 = off)
    hflip: bool = False  # random horizontal flip, p=0.5
    vflip: bool = False  # random vertical flip, p=0.5
    resized_crop: float = 0.0  # random-resized-crop min area scale (0 = off), ratio 3/4..4/3
    rotation: float = 0.0  # max rotation in degrees (0 = off)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (0 = off)
    policy: str = "none"  # none | randaugment | trivialaugment (torchvision, per sample, uint8)
    random_erasing: float = 0.0  # probability of erasing one random rectangle per sample
    mixup_alpha: float = 0.0  # Beta(a, a) mixup of batch pairs (0 = off); soft-target loss
    cutmix_alpha: float = 0.0  # Beta(a, a) cutmix box of batch pairs (0 = off)
    mix_prob: float = 1.0  # probability a micro-batch is mixed (when mixup/cutmix is on)
    switch_prob: float = 0.5  # with both on: probability of cutmix instead of mixup
    progressive_sizes: list[int] = field(default_factory=list)  # training side (px) of the
    #   first epochs, one per epoch (e.g. [20, 24]: epoch 1 at 20 px, epoch 2 at 24 px), batched
    #   antialiased resize on the device; later epochs and every eval use the full size


@dataclass
class ModelConfig:
    name: str = "resnet9"  # see `shardtrain models`: resnet9, resnet18/34/50, transfer, mlp
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # resnet9 stages
    hidden: list[int] = field(default_factory=lambda: [256])  # mlp hidden sizes
    batchnorm: bool = True  # mlp: BN after each hidden layer
    dropout: float = 0.0  # before the classifier (and in mlp / transfer heads)
    logit_scale: float = 1.0  # resnet9: logits x this (Page's DAWNBench network: 0.125)
    head_bias: bool = True  # resnet9: bias in the final linear layer (Page's network: false)
    small_stem: bool = True  # torchvision resnets: 3x3 stride-1 stem, no max-pool (28-64 px)
    backbone: str = "resnet34"  # transfer: torchvision backbone
    pretrained: str = "imagenet"  # transfer: "imagenet" (torchvision cache/download), a path, or ""
    head_hidden: int = 256  # transfer: hidden units of the new MLP head (0 = linear head)
    freeze_epochs: int = 0  # transfer: epochs with the backbone frozen before unfreezing
    init: str = "default"  # default | xavier (xavier-uniform convs/linears)
    channels_last: bool = False  # NHWC memory format (faster convs on GPU and most CPUs)
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    max_lr: float = 0.01  # peak learning rate of the schedule
    weight_decay: float = 1e-4  # applied to tensors with ndim >= 2 only (not BN, not biases)
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = True  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw
    schedule: str = "onecycle"  # onecycle | cosine | constant | plateau (lr_plateau.py)
    warmup_frac: float = 0.25  # share of total_steps rising to max_lr
    div_factor: float = 25.0  # onecycle: initial lr = max_lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = initial lr / final_div_factor
    plateau_factor: float = 0.5  # plateau: lr x this when val loss stops improving
    plateau_patience: int = 0  # plateau: evaluations without improvement before a cut
    plateau_threshold: float = 1e-3  # plateau: improvement = loss < best x (1 - threshold)
    min_lr: float = 1e-5  # plateau: the lr is never cut below this (x the group's lr_mult)
    clip_value: float = 0.0  # clip each gradient element to +-clip_value (0 = off)
    clip_norm: float = 0.0  # clip the global gradient L2 norm (0 = off)
    label_smoothing: float = 0.0
    l1: float = 0.0  # L1 penalty coefficient on weights with ndim >= 2
    head_lr_mult: float = 1.0  # lr multiplier of `model.head` params (transfer) vs the backbone


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0 = epochs x steps_per_epoch)
    seed: int = 0
    precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA) | auto (bf16 where native)
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 1  # epochs between validations
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0 = each epoch end)
    keep_checkpoints: int = 2  # newest checkpoints kept (the best is kept too)
    compile: bool = False  # torch.compile the model
    log_every: int = 20  # optimizer steps between train-metric logs
    dist_timeout: int = 600  # seconds before a stuck collective fails
    peer_timeout: int = 60  # seconds of silence before the other ranks stop (a closed
    #                         connection ends them at once; 0 = off): see peers.py
    ema_decay: float = 0.0  # EMA of weights+buffers per optimizer step (0 = off), e.g. 0.999
    ema_warmup: int = 0  # EMA decay = min(ema_decay, (1+n)/(ema_warmup+n)) at update n (0 = off)
    tta: str = "none"  # test-time augmentation at eval: none | flip | flip_translate (+-2 px)


@dataclass
class LogConfig:
    wandb: bool = True  # W&B via accelerate's tracker (offline without credentials)
    project: str = "shardtrain"
    entity: str = ""
    name: str = ""  # run name ("" = recipe + time)
    group: str = ""  # "" = recipe name
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    plots: bool = True  # plots/ PNGs at the end
    artifacts: bool = True  # W&B: the dataset (by reference) in, the model artifact out
    model_name: str = ""  # W&B model artifact name ("" = model-<run id>)
    predictions: int = 100  # rows of the W&B predictions table (test split, else val; 0 = none)
    histograms: bool = False  # W&B: per-layer parameter + gradient histograms at epoch ends


@dataclass
class Config:
    recipe: str = ""  # recipe name or path this config came from
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        check_choice("optim.name", self.optim.name, ["adam", "adamw", "sgd"])
        check_choice("optim.schedule", self.optim.schedule,
                     ["onecycle", "cosine", "constant", "plateau"])
        check_choice("train.precision", self.train.precision, ["no", "bf16", "fp16", "auto"])
        check_choice("data.scaling", self.data.scaling, ["standardize", "unit", "none"])
        check_choice("data.partition", self.data.partition, ["global", "node"])
        check_choice("model.init", self.model.init, ["default", "xavier"])
        check_choice("augment.policy", self.augment.policy,
                     ["none", "randaugment", "trivialaugment"])
        check_choice("train.tta", self.train.tta, ["none", "flip", "flip_translate"])
        if not 0 <= self.train.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        if self.data.workers < -1:
            raise UserError(f"data.workers must be >= 0 (or -1 = auto), got {self.data.workers}")
        for key, value in [("data.batch_size", self.data.batch_size),
                           ("train.grad_accum", self.train.grad_accum)]:
            if value < 1:
                raise UserError(f"{key} must be >= 1, got {value}")
        if self.train.epochs < 1 and self.train.max_steps < 1:
            raise UserError("train.epochs or train.max_steps must be >= 1")
        if any(size < 4 for size in self.augment.progressive_sizes):
            raise UserError(f"augment.progressive_sizes must be >= 4 px, got "
                            f"{self.augment.progressive_sizes}")
        if not 0 <= self.optim.warmup_frac < 1:
            raise UserError(f"optim.warmup_frac must be in [0, 1), got {self.optim.warmup_frac}")


# Keys that may change between a checkpoint and its resume without --allow-changes: where the
# data lives and how it is read, how long to train (a longer run continues the same LR schedule),
# and logging. Anything else (model, optimizer, augmentation, seed) changes what is trained.
RESUMABLE_CHANGES = ("data.path", "data.workers", "data.prefetch", "data.cache_dir",
                     "data.cache_limit", "data.prefetch_shards", "data.retries",
                     "data.retry_delay", "train.epochs",
                     "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.log_every", "train.dist_timeout", "train.peer_timeout", "log.wandb",
                     "log.name", "log.group", "log.tags", "log.plots", "log.artifacts",
                     "log.model_name", "log.predictions", "log.histograms")


def list_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    folder = resources.files("shardtrain") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")) or "/" in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe file not found: {recipe}")
        return path
    if recipe not in list_recipes():
        hint = closest(recipe, list_recipes())
        raise UserError(f"unknown recipe {recipe!r}{hint}; `shardtrain recipes` lists them")
    return Path(str(resources.files("shardtrain") / "recipes" / f"{recipe}.yaml"))


def recipe_header(recipe: str) -> dict[str, str]:
    """The `# purpose:` and `# result:` lines that open every shipped recipe (airbench-style
    evidence: what it reached, where, how fast, with which command, when)."""
    header: dict[str, str] = {}
    key = None
    for line in recipe_path(recipe).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        name, sep, rest = text.partition(":")
        if sep and name in ("purpose", "result"):
            key, header[name] = name, rest.strip()
        elif key and line.startswith("#  "):  # an indented continuation line
            header[key] += " " + text
        else:
            key = None
    return header


def load_config(recipe: str | None, overrides: list[str] = ()) -> Config:
    """Recipe YAML (name or path, None = defaults) + `section.key=value` overrides -> Config."""
    raw: dict = {}
    if recipe:
        with open(recipe_path(recipe)) as f:
            try:
                raw = load_yaml(f) or {}
            except yaml.YAMLError as e:
                raise UserError(f"recipe {recipe} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise UserError(f"recipe {recipe} must be a mapping of sections")
    apply_overrides(raw, list(overrides))
    raw.setdefault("recipe", recipe or "")
    return from_dict(Config, raw)


def config_hash(cfg: Config, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the resolved config minus `section.key` entries in `ignore` (recorded)."""
    d = asdict(cfg)
    for key in ignore:
        section, name = key.split(".")
        d[section].pop(name, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_changes(saved: dict, cfg: Config, ignore: tuple[str, ...] = RESUMABLE_CHANGES
                   ) -> list[str]:
    """`key: old -> new` for every key set in both configs whose value changed (minus `ignore`).

    Keys added to the config since the checkpoint was written are not changes: an upgrade that
    adds an option with its default keeps old checkpoints resumable.
    """
    old, new = flatten(saved), flatten(asdict(cfg))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if k not in ignore and old[k] != new[k]]


def config_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (config.yaml, `train --print-config`)."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_yaml(cfg))
