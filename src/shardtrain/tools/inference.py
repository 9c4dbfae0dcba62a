"""Evaluate a saved model on a split, and predict the class of image files.

    shardtrain eval --checkpoint runs/demo --data shards/fashion-mnist-12k --split test
    shardtrain predict --checkpoint runs/demo/model.safetensors shoe.jpg shirt.png

Weights files carry their own metadata (model, classes, normalisation), so nothing else is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import Accelerator

from shardtrain.data.batch import BatchOptions
from shardtrain.checkpoint import load_weights
from shardtrain.data.codec import decode_image
from shardtrain.data.index import load_index, sample_table
from shardtrain.data.loader import SampleOptions, make_eval_loader
from shardtrain.data.transforms import normalize, resize_sample
from shardtrain.ema import split_ema
from shardtrain.errors import UserError
from shardtrain.evaluate import evaluate
from shardtrain.models import create_model

MAX_IMAGE_BYTES = 64 * 2**20  # refuse larger files before decoding them


def load_model(checkpoint: str) -> tuple[torch.nn.Module, dict]:
    """Model in eval mode with the weights and metadata of a weights file / checkpoint / run."""
    state, meta = load_weights(checkpoint)
    # older weights files kept `pretrained`: the file holds every weight, never reload them
    kwargs = {**meta["model_kwargs"], "pretrained": ""}
    model = create_model(meta["model"], len(meta["classes"]), meta["channels"], **kwargs)
    model_state, ema_state = split_ema(state)  # a checkpoint of an EMA run: use the EMA
    ema_state.pop("n_averaged", None)
    model.load_state_dict(ema_state or model_state)
    return model.eval(), meta


def batch_options(meta: dict) -> BatchOptions:
    return BatchOptions(torch.tensor(meta["mean"]), torch.tensor(meta["std"]), meta["scaling"])


def eval_checkpoint(checkpoint: str, data: str, split: str, out: Path | None,
                    batch_size: int = 256, workers: int = 2) -> dict:
    """Accuracy, top-5, loss, per-class accuracy and a confusion-matrix PNG for one split."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, meta = load_model(checkpoint)
    index = load_index(data)
    if index.classes != meta["classes"]:
        raise UserError(f"the classes of {data} differ from the model's: {index.classes[:5]}... "
                        f"vs {meta['classes'][:5]}...")
    table = sample_table(index, split)
    options = SampleOptions(channels=meta["channels"], image_size=meta["image_size"], train=False)
    loader = make_eval_loader(table, options, world_size=accelerator.num_processes,
                              rank=accelerator.process_index, batch_size=batch_size,
                              workers=workers, pin_memory=torch.cuda.is_available())
    result = evaluate(model.to(accelerator.device), loader, accelerator, batch_options(meta),
                      len(meta["classes"]))
    result = {"checkpoint": str(checkpoint), "data": str(data), "split": split, **result,
              "per_class_acc": dict(zip(meta["classes"], result["per_class_acc"]))}
    if out and accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        from shardtrain.tracking.plots import plot_confusion

        plot_confusion(result["confusion"], meta["classes"], out.with_suffix(".png"))
    return result


@torch.no_grad()
def predict_images(checkpoint: str, paths: list[str], topk: int = 1) -> list[dict]:
    """[{path, predictions: [(class, prob), ...]} or {path, error}] for each image file."""
    model, meta = load_model(checkpoint)
    opts = batch_options(meta)
    results = []
    for path in paths:
        try:
            image = read_image(Path(path), meta["channels"])
        except (OSError, ValueError) as e:
            results.append({"path": path, "error": str(e)})
            continue
        image = resize_sample(image, meta["image_size"])[None]  # (1, C, H, W) uint8
        x = normalize(image, opts.mean, opts.std, opts.scaling)
        probs = model(x).float().softmax(dim=1)[0]
        top = probs.topk(min(topk, len(probs)))
        results.append({"path": path, "predictions": [
            (meta["classes"][i], float(p)) for p, i in zip(top.values, top.indices)]})
    return results


def read_image(path: Path, channels: int) -> torch.Tensor:
    if not path.is_file():
        raise ValueError("no such file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"file larger than {MAX_IMAGE_BYTES >> 20} MB")
    ext = path.suffix.lower().lstrip(".")
    return decode_image(path.read_bytes(), "npy" if ext == "npy" else "img", channels)
