"""Transfer learning: a pretrained torchvision ResNet backbone with a new MLP head.

    model = create_model("transfer", num_classes=5, in_chans=3, backbone="resnet34",
                         pretrained="imagenet", head_hidden=256, dropout=0.2)
    set_backbone_trainable(model, False)  # first freeze_epochs: train the head only
    ...
    set_backbone_trainable(model, True)

`pretrained` is "imagenet" (torchvision's DEFAULT weights through its cache
`$TORCH_HOME/hub/checkpoints/`, downloaded when online), a path to a local `.pth`/`.pt`/
`.safetensors` state dict, or "" for random init. For in_chans != 3 the pretrained conv1 kernel
is averaged over its input channels (scaled so a grey image replicated to RGB gives the same
response, as timm's `adapt_input_conv` does for 1 channel).

While the backbone is frozen its BatchNorm layers stay in eval mode (running statistics are
not updated), also after `model.train()`. Freeze and unfreeze the unwrapped model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from shardtrain.models import init_xavier_, register

BACKBONES = ("resnet18", "resnet34", "resnet50")


class TransferNet(nn.Module):
    """backbone (features, (B, F)) -> head (logits, (B, num_classes))."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # frozen BN keeps its pretrained running statistics
        return self


def set_backbone_trainable(model: TransferNet, trainable: bool) -> None:
    """Freeze (trainable=False) or unfreeze the backbone; frozen BN layers run in eval mode."""
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
    model.backbone_frozen = not trainable
    model.train(model.training)


def make_head(in_features: int, num_classes: int, head_hidden: int, dropout: float) -> nn.Module:
    """Linear -> ReLU -> Dropout -> Linear, or Dropout -> Linear when head_hidden == 0."""
    if head_hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(
        nn.Linear(in_features, head_hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(head_hidden, num_classes),
    )


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT ImageNet weights for `backbone`, from its cache or downloaded."""
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache_dir / os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except OSError as err:  # urllib's URLError (offline) is an OSError
        raise RuntimeError(
            f"could not download ImageNet weights for {backbone} from {weights.url} ({err}). "
            f"Offline: copy the file to {cached} (or set TORCH_HOME), "
            f"or pass model.pretrained=<path to a .pth/.safetensors state dict>."
        ) from err


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or torch file (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional dependency, only for this format

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def adapt_conv1(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(O, 3, k, k) RGB kernel -> (O, in_chans, k, k): channel average, scaled by 3 / in_chans."""
    if weight.shape[1] == in_chans:
        return weight
    summed = weight.sum(dim=1, keepdim=True)  # response of a grey image replicated to all channels
    return (summed / in_chans).repeat(1, in_chans, 1, 1)


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], in_chans: int) -> None:
    """Load a torchvision ResNet state dict into `model` (fc removed), adapting conv1."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_conv1(state["conv1.weight"], in_chans)
    model.load_state_dict(state, strict=True)


@register("transfer")
def transfer(
    num_classes: int,
    in_chans: int = 3,
    backbone: str = "resnet34",
    pretrained: str = "imagenet",
    head_hidden: int = 256,
    dropout: float = 0.0,
    init: str = "default",
) -> TransferNet:
    """Pretrained ResNet backbone + new head; init="xavier" re-initialises only new layers."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    net = getattr(torchvision.models, backbone)(weights=None)
    in_features = net.fc.in_features
    net.fc = nn.Identity()
    if in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained:
        state = imagenet_state_dict(backbone) if pretrained == "imagenet" else (
            load_state_dict_file(pretrained))
        load_backbone_weights(net, state, in_chans)
    head = make_head(in_features, num_classes, head_hidden, dropout)
    if init == "xavier":
        init_xavier_(head)
        if not pretrained:
            init_xavier_(net)
    return TransferNet(net, head)
