"""The command line as users type it: one command table, intermixed overrides, exit codes."""

from __future__ import annotations

import pytest
import yaml

from shardtrain import cli
from shardtrain.config import list_recipes, recipe_header
from shardtrain.errors import DataError, ExitCode, NonFiniteLoss, UserError


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_overrides_may_stand_anywhere_among_the_options(capsys, tiny_shards):
    code, out, err = run_cli(["train", "--recipe", "fashion-mnist-resnet9", "train.epochs=1",
                              "--data", str(tiny_shards), "train.seed=7", "--print-config",
                              "optim.max_lr=0.02"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["seed"] == 7
    assert cfg["optim"]["max_lr"] == 0.02 and cfg["data"]["path"] == str(tiny_shards)
    assert cfg["recipe"] == "fashion-mnist-resnet9"


def test_print_config_starts_no_training(capsys, tmp_path):
    code, out, _ = run_cli(["train", "--recipe", "fashion-mnist-resnet9", "--print-config",
                            "--out", str(tmp_path / "run")], capsys)
    assert code == 0 and "batch_size: 128" in out and not (tmp_path / "run").exists()


def test_top_level_help_describes_the_tool_and_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "WebDataset shards" in out and "75 preempted" in out
    for name in cli.COMMANDS:
        assert f"\n    {name} " in out, name


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--bogus"]])
def test_missing_or_unknown_command_is_a_usage_error(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "usage: shardtrain" in err


def test_user_errors_are_one_line_with_their_exit_code(capsys, tmp_path):
    code, out, err = run_cli(["train", "--recipe", "fashion-mnist-resnet9",
                              "optim.max_lrr=1", "--data", str(tmp_path)], capsys)
    assert code == ExitCode.USAGE
    assert err.strip().splitlines() == [
        "shardtrain: error: unknown config key 'optim.max_lrr' (did you mean 'optim.max_lr'?)"]


def test_exit_codes_are_defined_once_with_their_errors():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 75, 130]
    assert UserError.exit_code == 2 and DataError.exit_code == 1
    assert NonFiniteLoss.exit_code == 3


def test_recipes_lists_purpose_and_evidence_of_every_recipe(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    for name in list_recipes():
        header = recipe_header(name)
        assert header.get("purpose") and header.get("result"), f"{name}: no evidence header"
        assert f"{name}\n  {header['purpose']}\n  result: {header['result']}" in out
    default = recipe_header("fashion-mnist-resnet9")["result"]
    assert "93.66%" in default and "bench/time_to_accuracy.py" in default
