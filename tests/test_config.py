"""Config: recipes load, overrides are typed, mistakes are one-line errors naming the key."""

import pytest

from shardtrain.config import Config, list_recipes, load_config
from shardtrain.errors import UserError


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.recipe == name


def test_expected_recipes_ship():
    expected = {"fashion-mnist-resnet9", "fashion-mnist-mlp", "cifar10-resnet9", "cifar10-resnet18",
                "fruits360-resnet9", "intel-resnet34-transfer", "flowers-transfer"}
    assert expected <= set(list_recipes())


def test_overrides_are_parsed_and_typed():
    cfg = load_config("fashion-mnist-resnet9", ["optim.max_lr=0.02", "train.epochs=3",
                                                "model.widths=[8,16,32,64]", "log.wandb=false",
                                                "log.tags=a,b", "optim.weight_decay=0"])
    assert cfg.optim.max_lr == 0.02 and cfg.train.epochs == 3
    assert cfg.model.widths == [8, 16, 32, 64] and cfg.log.wandb is False
    assert cfg.log.tags == ["a", "b"] and cfg.optim.weight_decay == 0.0


@pytest.mark.parametrize("override,message", [
    ("optim.max_lrr=0.1", "did you mean 'optim.max_lr'"),
    ("train.epochs=three", "train.epochs must be int"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("epochs=3", "section.key=value"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
])
def test_mistakes_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config("fashion-mnist-resnet9", [override])


def test_unknown_recipe_suggests_closest():
    with pytest.raises(UserError, match="did you mean 'fashion-mnist-resnet9'"):
        load_config("fashion-mnist-resnet")
