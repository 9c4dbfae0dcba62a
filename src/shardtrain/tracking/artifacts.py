"""W&B artifacts: the dataset into the run's lineage, the trained model out, and back again.

    use_dataset(run, data)                         # at start: a `dataset` artifact, used
    log_model(run, cfg, run_dir, final)            # at the end: a `model` artifact
    resolve_checkpoint("wandb:me/shardtrain/model-3f9c2a1b:best")  # -> a local folder (online)

Dataset: named after the index (`index.json` "name"), holding index.json itself (a few KB,
uploaded: its bytes, hence the version, change exactly when the index hash does; the alias
`index-<hash[:12]>` names that hash) and a reference (not an upload) to every shard and sidecar
listed in it, `file://` for a local folder or the dataset's URL. References are not checksummed:
the index already holds each shard's sha256.

Model: named `log.model_name` or `model-<run id>`, type `model`, file `model.safetensors` (the
weights with their own metadata, loadable by eval/predict/export). The final weights carry the
alias `latest`; with validation, the best-by-val weights carry `best` (one version with both
aliases when they are the same bytes, else best is logged first: wandb tags every version it
logs `latest` and the server moves that alias to the newest). Metadata: recipe, model, classes,
normalisation, index hash and the final metrics. `log.artifacts=false` turns both off.

Offline, wandb keeps a copy of each uploaded file in its staging folder ($WANDB_DATA_DIR,
default ~/.local/share/wandb/artifacts/staging) until `wandb sync` uploads it. wandb refuses
`use_artifact` offline, so offline the dataset goes through the same record `use_artifact`
writes for a new artifact (log + use after commit): `wandb sync` then links it as the run's input.
"""

from __future__ import annotations

import re
from pathlib import Path

from shardtrain.checkpoint import read_meta
from shardtrain.data.index import sha256_file
from shardtrain.errors import UserError

PREFIX = "wandb:"


def artifact_name(text: str) -> str:
    """W&B artifact names: letters, digits, '-', '_', '.'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "dataset"


def shard_uri_base(data_path: str) -> str:
    """The URI prefix of the shard files: the URL as given, or file:// of the local folder."""
    if "://" in data_path:
        return data_path.rstrip("/")
    return Path(data_path).resolve().as_uri()


def dataset_artifact(index, index_json: bytes, digest: str):
    """A `dataset` artifact for the shards of `index` (data.index.Index), whose index.json holds
    `index_json`, of sha256 `digest` (see the module docstring)."""
    import wandb

    splits = {name: split.num_samples for name, split in index.splits.items()}
    artifact = wandb.Artifact(
        artifact_name(index.name or Path(index.location).name), type="dataset",
        description=f"shardtrain shards: {', '.join(f'{k} {v}' for k, v in splits.items())}",
        metadata={"index_hash": digest, "classes": index.classes, "splits": splits,
                  "channels": index.channels, "image_size": index.image_size,
                  "mean": index.mean, "std": index.std, "path": index.location})
    with artifact.new_file("index.json", mode="xb") as f:  # a folder's or a URL's, as read
        f.write(index_json)
    # shards at index.json's shard_base (`shardtrain index --out`), sidecars beside index.json
    bases = {"file": shard_uri_base(index.shard_base),
             "samples_file": shard_uri_base(index.location)}
    for split in index.splits.values():
        for shard in split.shards:
            for key, base in bases.items():
                artifact.add_reference(f"{base}/{shard[key]}", name=f"shards/{shard[key]}",
                                       checksum=False)
    return artifact, [f"index-{digest[:12]}"]


def use_dataset(run, data) -> str:
    """Declare the dataset (a train.Data) as the run's input; returns the artifact's name."""
    artifact, aliases = dataset_artifact(data.index, data.index_json, data.index_hash)
    if run.offline:  # what use_artifact does for a new artifact, minus its wait for the upload
        run._log_artifact(artifact, aliases=aliases, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact, aliases=aliases)
    return artifact.name


def model_metadata(cfg, weights: Path, index_hash: str, metrics: dict) -> dict:
    meta = read_meta(weights)
    return {"recipe": cfg.recipe, "model": meta.get("model"), "classes": meta.get("classes"),
            "image_size": meta.get("image_size"), "channels": meta.get("channels"),
            "normalization": {k: meta.get(k) for k in ("scaling", "mean", "std")},
            "index_hash": index_hash,
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}}


def log_model(run, cfg, run_dir: Path, final: dict, index_hash: str) -> str:
    """`model` artifact versions: best (alias best), then final (alias latest). Returns its name."""
    import wandb

    name = artifact_name(cfg.log.model_name or f"model-{run.id}")
    final_path = run_dir / "model.safetensors"
    best_path = run_dir / "checkpoints" / "best.safetensors"
    aliases = ["latest"]
    if best_path.is_file():
        if sha256_file(best_path) == sha256_file(final_path):
            aliases.append("best")
        else:
            best = wandb.Artifact(name, type="model", metadata=model_metadata(
                cfg, best_path, index_hash, {"weights": "best", "val_acc": final["best_val_acc"]}))
            best.add_file(str(best_path), name="model.safetensors")
            run.log_artifact(best, aliases=["best"])
    artifact = wandb.Artifact(name, type="model", metadata=model_metadata(
        cfg, final_path, index_hash, {"weights": "final", **final}))
    artifact.add_file(str(final_path), name="model.safetensors")
    run.log_artifact(artifact, aliases=aliases)
    return name


def resolve_checkpoint(checkpoint: str) -> str:
    """`wandb:[ENTITY/PROJECT/]NAME[:ALIAS]` -> the downloaded artifact's folder; else unchanged.

    Online only: offline (or without credentials) it is a one-line UserError."""
    if not checkpoint.startswith(PREFIX):
        return checkpoint
    from shardtrain.tracking.wandb_run import wandb_mode_from_env

    name = checkpoint[len(PREFIX):]
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    mode = wandb_mode_from_env()
    if mode != "online":
        raise UserError(f"--checkpoint {checkpoint}: downloading a W&B artifact needs W&B online "
                        f"(W&B is {mode} here: `wandb login`, or WANDB_MODE=online)")
    import wandb

    try:
        artifact = wandb.Api(timeout=30).artifact(name, type="model")
        return artifact.download()
    except Exception as e:  # no network, unknown artifact, no access: one line
        raise UserError(f"--checkpoint {checkpoint}: cannot download it from W&B: "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from None
