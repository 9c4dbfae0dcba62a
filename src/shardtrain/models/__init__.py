"""Model registry: `create_model(name, num_classes, in_chans, **model_cfg)` builds any model.

    model = create_model("resnet9", num_classes=10, in_chans=1, widths=[32, 64, 128, 256])

The trainer passes the whole model config as keyword arguments; each factory takes only the
keywords in its signature and the rest are dropped, so one `ModelConfig` serves every model.
`init="xavier"` re-initialises conv/linear weights (xavier-uniform, zero bias) unless the
factory handles `init` itself (`transfer` does, to keep pretrained backbone weights).
Add a model with `@register("name")` on a factory `(num_classes, in_chans, **kw) -> nn.Module`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model factory to MODELS under `name`."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def accepted_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `factory` accepts (all of them if it takes **kwargs)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build registered model `name`; keyword arguments the factory does not take are dropped."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
    factory = MODELS[name]
    init = kwargs.get("init", "default")
    if init not in ("default", "xavier"):
        raise ValueError(f"unknown init {init!r}; choose from default, xavier")
    model_kwargs = accepted_kwargs(factory, kwargs)
    model = factory(num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    if init == "xavier" and "init" not in model_kwargs:
        init_xavier_(model)
    return model


def init_xavier_(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every conv and linear layer, in place."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


# Importing the model modules registers them (as timm does); they only define classes/functions.
from shardtrain.models import mlp, resnet, transfer  # noqa: E402, F401
