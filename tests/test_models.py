"""Model registry: forward/backward of every model, init, stems, pretrained loading, freezing."""

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from shardtrain.models import MODELS, create_model, list_models, register
from shardtrain.models import transfer as transfer_mod
from shardtrain.models.transfer import set_backbone_trainable

# Small versions of each model so the suite stays fast on 2 CPU cores.
TINY = dict(widths=[8, 8, 16, 16], hidden=[16], backbone="resnet18", pretrained="",
            head_hidden=8, dropout=0.1, small_stem=False)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_chans,size", [(1, 28), (3, 32)])
def test_forward_backward(name, in_chans, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=in_chans, image_size=size, **TINY)
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_model_and_extra_kwargs():
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from .*resnet9"):
        create_model("nope", num_classes=2)
    model = create_model("resnet9", num_classes=2, in_chans=1, not_a_kwarg=1, widths=[4, 4, 8, 8])
    assert model[-1].out_features == 2 and model[0][0].in_channels == 1
    with pytest.raises(ValueError, match="already registered"):
        register("resnet9")(lambda num_classes, in_chans: nn.Linear(1, 1))
    assert set(MODELS) == set(list_models())


def test_xavier_init():
    model = create_model("mlp", num_classes=3, in_chans=1, image_size=8, hidden=[32],
                         init="xavier")
    lin = model[1]
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.5 * bound
    assert (lin.bias == 0).all()
    default = create_model("mlp", num_classes=3, in_chans=1, image_size=8, hidden=[32])
    assert (default[1].bias != 0).any()


def test_small_stem_shapes():
    model = create_model("resnet18", num_classes=4, in_chans=1, small_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    feats = model.layer4(model.layer3(model.layer2(model.layer1(model.conv1(
        torch.zeros(1, 1, 32, 32))))))
    assert feats.shape == (1, 512, 4, 4)  # 32 / 8 with the small stem (1 x 1 without)
    big = create_model("resnet18", num_classes=4, in_chans=1, small_stem=False)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1


def resnet18_state(path: Path) -> dict:
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def test_transfer_local_weights(tmp_path):
    state = resnet18_state(tmp_path / "w.pth")
    model = create_model("transfer", num_classes=3, backbone="resnet18",
                         pretrained=str(tmp_path / "w.pth"), head_hidden=0)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert model.head[-1].out_features == 3
    grey = create_model("transfer", num_classes=3, in_chans=1, backbone="resnet18",
                        pretrained=str(tmp_path / "w.pth"))
    # a grey image gives the same conv1 response as its RGB replica through the RGB kernel
    assert torch.allclose(grey.backbone.conv1.weight[:, 0], state["conv1.weight"].sum(1))
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "w.safetensors"))
    st = create_model("transfer", num_classes=3, backbone="resnet18",
                      pretrained=str(tmp_path / "w.safetensors"))
    assert torch.equal(st.backbone.bn1.running_var, state["bn1.running_var"])
    with pytest.raises(FileNotFoundError):
        create_model("transfer", num_classes=3, backbone="resnet18",
                     pretrained=str(tmp_path / "missing.pth"))


def test_transfer_imagenet_from_torch_cache(tmp_path, monkeypatch):
    """The real torchvision cache path: the file placed where torchvision looks for it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() reads it per call
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = resnet18_state(cache / os.path.basename(url))
    model = create_model("transfer", 2, backbone="resnet18", pretrained="imagenet")
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_transfer_imagenet_offline_message(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="hub/checkpoints/resnet18-.*pretrained=<path"):
        transfer_mod.imagenet_state_dict("resnet18")


def test_transfer_freezing():
    model = create_model("transfer", num_classes=3, backbone="resnet18", pretrained="",
                         head_hidden=8)
    set_backbone_trainable(model, False)
    model.train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training and not model.backbone.bn1.training
    assert model.head.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert torch.equal(model.backbone.bn1.running_mean, before)  # frozen BN stats untouched
    assert model.backbone.conv1.weight.grad is None
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())
    assert model.backbone.bn1.training
    model.eval()
    assert not model.backbone.training


def test_resnet9_logit_scale_and_bias_free_head_as_in_page_dawnbench():
    """Page's network ends with a bias-free linear layer and logits x 0.125; the defaults keep
    the biased, unscaled head that the FashionMNIST recipes were tuned with."""
    torch.manual_seed(0)
    plain = create_model("resnet9", 10, 3, widths=[8, 8, 16, 16])
    assert plain[-1].bias is not None
    torch.manual_seed(0)
    page = create_model("resnet9", 10, 3, widths=[8, 8, 16, 16], logit_scale=0.125,
                        head_bias=False)
    heads = [m for m in page.modules() if isinstance(m, nn.Linear)]
    assert len(heads) == 1 and heads[0].bias is None
    page.load_state_dict({k: v for k, v in plain.state_dict().items()
                          if k in page.state_dict()})  # strict: all but the head bias
    plain[-1].bias.data.zero_()
    x = torch.randn(2, 3, 16, 16)
    plain.eval(), page.eval()
    assert torch.allclose(page(x), 0.125 * plain(x), atol=1e-6)


def test_cifar10_resnet9_recipe_builds_page_network():
    from shardtrain.config import load_config
    from shardtrain.train import build_model

    cfg = load_config("cifar10-resnet9")
    assert (cfg.optim.max_lr, cfg.optim.label_smoothing) == (0.4, 0.2)
    index = type("Index", (), {"classes": [str(i) for i in range(10)], "channels": 3,
                               "mean": [0.5] * 3, "std": [0.25] * 3})()
    model, meta = build_model(cfg, index, 32)
    assert meta["model_kwargs"]["logit_scale"] == 0.125
    assert [m.bias for m in model.modules() if isinstance(m, nn.Linear)] == [None]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), 0.125 * model[:-1](x), atol=1e-6)  # the last layer scales
