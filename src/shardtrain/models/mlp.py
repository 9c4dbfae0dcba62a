"""The FashionMNIST tutorial MLP: Flatten -> [Linear -> BN? -> ReLU -> Dropout?]* -> Linear.

    model = create_model("mlp", num_classes=10, in_chans=1, image_size=28, hidden=[256, 128])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from shardtrain.models import register


@register("mlp")
def mlp(
    num_classes: int,
    in_chans: int = 1,
    image_size: int = 28,
    hidden: Sequence[int] = (256,),
    batchnorm: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Fully connected classifier of (B, in_chans, image_size, image_size) images."""
    if image_size < 1:
        raise ValueError(f"mlp needs the input image_size in px, got {image_size}")
    layers: list[nn.Module] = [nn.Flatten()]  # (B, in_chans * image_size**2)
    in_features = in_chans * image_size * image_size
    for width in hidden:
        layers.append(nn.Linear(in_features, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)
