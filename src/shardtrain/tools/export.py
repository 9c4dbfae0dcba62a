"""`shardtrain export`: a standalone model file with the normalisation and class names inside.

    shardtrain export --checkpoint runs/demo --format onnx          # -> runs/demo/model.onnx
    shardtrain export --checkpoint runs/demo --format torchscript   # -> runs/demo/model.pt

Input: NCHW images with values 0..255 at the model's image size (meta image_size, channels);
TorchScript takes uint8 or float, ONNX takes float32 (cast uint8 first). Output: logits.
The recipe's scaling (standardize/unit/none, mean/std) is folded into the file as
`x * scale + shift`, so callers need no preprocessing beyond resizing.
Class names: ONNX metadata_props["classes"] (JSON list, plus "shardtrain" = the weights
metadata); TorchScript extra files "classes.json" and "meta.json"
(`torch.jit.load(path, _extra_files={"classes.json": ""})`).
Run it with onnxruntime: `sess.run(None, {"images": x.astype(np.float32)})[0]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from shardtrain.tools.inference import load_model


class Normalized(nn.Module):
    """model(x * scale + shift) for 0..255 NCHW input of any dtype."""

    def __init__(self, model: nn.Module, meta: dict):
        super().__init__()
        self.model = model
        mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
        if meta["scaling"] == "standardize":  # (x/255 - mean)/std
            scale, shift = 1.0 / (255.0 * std), -mean / std
        elif meta["scaling"] == "unit":
            scale, shift = torch.full_like(std, 1 / 255.0), torch.zeros_like(mean)
        else:
            scale, shift = torch.ones_like(std), torch.zeros_like(mean)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


def export_model(checkpoint: str, fmt: str, out: Path | None = None) -> Path:
    """Write the ONNX / TorchScript file; returns its path."""
    model, meta = load_model(checkpoint)
    wrapped = Normalized(model, meta).eval()
    ckpt = Path(checkpoint)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    out = Path(out or folder / ("model.onnx" if fmt == "onnx" else "model.pt"))
    out.parent.mkdir(parents=True, exist_ok=True)
    size = meta["image_size"]
    example = torch.randint(0, 256, (2, meta["channels"], size, size)).float()
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, example)
        torch.jit.save(traced, str(out), _extra_files={
            "classes.json": json.dumps(meta["classes"]), "meta.json": json.dumps(meta)})
    elif fmt == "onnx":
        export_onnx(wrapped, example, meta, out)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from onnx, torchscript")
    return out


def export_onnx(wrapped: nn.Module, example: torch.Tensor, meta: dict, out: Path) -> None:
    import onnx  # the `onnx` extra: pip install 'shardtrain[onnx]'

    # the TorchScript-based exporter (dynamo=False) needs no onnxscript
    torch.onnx.export(wrapped, (example,), str(out), dynamo=False, input_names=["images"],
                      output_names=["logits"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(out))
    for key, value in (("classes", json.dumps(meta["classes"])),
                       ("shardtrain", json.dumps(meta))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
