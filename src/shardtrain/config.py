"""Config: nested dataclasses filled from a recipe YAML, then from `section.key=value` overrides.

Defaults live only in the dataclass fields below; a recipe lists only what it changes.

    cfg = load_config("fashion-mnist-resnet9", ["optim.max_lr=0.02", "train.epochs=3"])

Unknown keys and wrong types raise UserError naming the key (and the closest known key).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from shardtrain.errors import UserError


@dataclass
class DataConfig:
    path: str = ""  # shard folder holding index.json (also --data)
    image_size: int = 0  # train/eval side length in px; 0 = the index's image size
    batch_size: int = 128  # global batch: per-device batch x processes x grad_accum
    workers: int = 2  # loader worker processes per rank
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


@dataclass
class ModelConfig:
    name: str = "resnet9"  # see `shardtrain models`: resnet9, resnet18/34/50, transfer, mlp
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # resnet9 stages
    hidden: list[int] = field(default_factory=lambda: [256])  # mlp hidden sizes
    batchnorm: bool = True  # mlp: BN after each hidden layer
    dropout: float = 0.0  # before the classifier (and in mlp / transfer heads)
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
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_frac: float = 0.25  # share of total_steps rising to max_lr
    div_factor: float = 25.0  # onecycle: initial lr = max_lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = initial lr / final_div_factor
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
        check_choice("optim.schedule", self.optim.schedule, ["onecycle", "cosine", "constant"])
        check_choice("train.precision", self.train.precision, ["no", "bf16", "fp16", "auto"])
        check_choice("data.scaling", self.data.scaling, ["standardize", "unit", "none"])
        check_choice("model.init", self.model.init, ["default", "xavier"])
        check_choice("augment.policy", self.augment.policy,
                     ["none", "randaugment", "trivialaugment"])
        check_choice("train.tta", self.train.tta, ["none", "flip", "flip_translate"])
        if not 0 <= self.train.ema_decay < 1:
            raise UserError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        for key, value in [("data.batch_size", self.data.batch_size),
                           ("train.grad_accum", self.train.grad_accum)]:
            if value < 1:
                raise UserError(f"{key} must be >= 1, got {value}")
        if self.train.epochs < 1 and self.train.max_steps < 1:
            raise UserError("train.epochs or train.max_steps must be >= 1")
        if not 0 <= self.optim.warmup_frac < 1:
            raise UserError(f"optim.warmup_frac must be in [0, 1), got {self.optim.warmup_frac}")


def check_choice(key: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def list_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    folder = resources.files("shardtrain") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as
    booleans, which would turn `precision: no` (or `train.precision=no`) into False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text):
    """Parse YAML text (or an open file) safely, with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_YamlLoader)


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
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"{section} is not a config section")
        raw[section][name] = parse_value(text)
    raw.setdefault("recipe", recipe or "")
    return from_dict(Config, raw, prefix="")


def parse_value(text: str):
    """`3` -> 3, `0.1` -> 0.1, `true` -> True, `[64,128]` -> list, `a,b` -> ['a', 'b']."""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and "," in value:
        value = [load_yaml(v) for v in value.split(",")]
    return "" if value is None else value


def from_dict(cls, raw: dict, prefix: str):
    """Build dataclass `cls` from a dict, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            full = f"{prefix}{key}"
            known = [f"{prefix}{k}" for k in fields]
            raise UserError(f"unknown config key {full!r}{closest(full, known)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{prefix}{key} must be a section (mapping), got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def coerce(key: str, value, hint):
    """Check `value` against a field type (int, float, bool, str, list[...]); int -> float ok."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [coerce(key, v, item_type) for v in items]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def config_hash(cfg: Config, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the resolved config minus `section.key` entries in `ignore` (recorded)."""
    d = asdict(cfg)
    for key in ignore:
        section, name = key.split(".")
        d[section].pop(name, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict:
    """{'optim': {'max_lr': 0.1}} -> {'optim.max_lr': 0.1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every key set in both configs whose value changed (minus `ignore`).

    Keys added to the config since the checkpoint was written are not changes: an upgrade that
    adds an option with its default keeps old checkpoints resumable.
    """
    old, new = flatten(saved), flatten(asdict(cfg))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if k not in ignore and old[k] != new[k]]


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
