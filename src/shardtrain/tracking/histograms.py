"""Per-layer distributions: W&B histograms at epoch ends and the end-of-run weights PNG.

    counts = layer_histograms(model)                # {"parameters/fc.weight": (counts, edges)}
    counts = layer_histograms(model, grads=True)    # {"gradients/fc.weight": ...}, at a step
    plot_weight_distributions({"run": state_dict}, "plots/weights.png")

`log.histograms=true` logs both kinds for every parameter tensor at each epoch end, the names
wandb.watch uses (parameters/NAME, gradients/NAME); the gradients are those of the epoch's last
optimizer step, before clipping. The PNG shows the weights (tensors with ndim >= 2: the conv and
linear layers) of one or more runs, one violin per layer and one row per run: the FashionMNIST
tutorial's "parameter distribution across layers" figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shardtrain.tracking.plots import save

BINS = 64
VIOLIN_SAMPLES = 4000  # values per layer drawn in a violin (evenly strided, deterministic)


@torch.no_grad()
def tensor_histogram(t: torch.Tensor, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """(counts (bins,), edges (bins + 1,)) of the finite values of `t`."""
    values = t.detach().float().flatten()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        values = torch.zeros(1, device=t.device)
    lo, hi = float(values.min()), float(values.max())  # note: CPU-GPU sync, epoch ends only
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(values, bins=bins, min=lo, max=hi)
    return counts.cpu().numpy(), np.linspace(lo, hi, bins + 1)


def layer_histograms(model: torch.nn.Module, grads: bool = False) -> dict:
    """{"parameters/NAME" or "gradients/NAME": (counts, edges)} for every parameter tensor."""
    out = {}
    for name, p in model.named_parameters():
        if grads:
            if p.grad is not None:
                out[f"gradients/{name}"] = tensor_histogram(p.grad)
        else:
            out[f"parameters/{name}"] = tensor_histogram(p)
    return out


def layer_weights(state_dict: dict) -> dict[str, np.ndarray]:
    """{layer: up to VIOLIN_SAMPLES values} of every weight with ndim >= 2 (conv, linear)."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("weight") and t.ndim >= 2 and not name.startswith("ema."):
            flat = t.detach().float().flatten().cpu().numpy()
            stride = max(1, len(flat) // VIOLIN_SAMPLES)
            shape = "x".join(str(n) for n in t.shape)  # e.g. 256x784 (out x in)
            out[f"{name.removesuffix('.weight')} {shape}"] = flat[::stride]
    return out


def plot_weight_distributions(runs: dict[str, dict], out_png: Path) -> Path:
    """One row per run ({name: state_dict}), one violin per layer (input side on the left)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = {name: layer_weights(state) for name, state in runs.items()}
    width = max(6.0, 0.7 * max(len(v) for v in layers.values()) + 2)
    fig = Figure(figsize=(min(width, 24), 2.6 * len(layers)), dpi=100)
    FigureCanvasAgg(fig)
    for row, (run, weights) in enumerate(layers.items()):
        ax = fig.add_subplot(len(layers), 1, row + 1)
        if weights:
            ax.violinplot(list(weights.values()), showextrema=True, showmedians=True)
            ax.set_xticks(range(1, len(weights) + 1))
            ax.set_xticklabels(list(weights), rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{run}: weights per layer", fontsize=9)
        ax.set_ylabel("value")
    return save(fig, out_png)
