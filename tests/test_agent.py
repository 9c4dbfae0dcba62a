"""`wandb agent` sweeps offline: the argument forms it passes, the run id it assigns (adopted by
final.json, checkpoints and --resume), the example sweep YAML and the SLURM agent script; and
credentials for a self-hosted W&B server. No W&B server runs here: the agent's side is
reproduced with wandb's own code (sweep command expansion, the sweep parameter file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import RUNS, read_json, run_shardtrain
from shardtrain.cli import override_forms
from shardtrain.config import load_config
from shardtrain.tracking.wandb_run import run_banner
from wandb_offline import find_offline_runs, read_offline_runs_by_id

pytest.importorskip("wandb")
from wandb.sdk.launch.sweeps import utils as sweep_utils  # noqa: E402
from wandb.sdk.lib import config_util  # noqa: E402

pytestmark = RUNS  # real training subprocesses

ROOT = Path(__file__).resolve().parents[1]
SWEEP_YAML = ROOT / "launch" / "wandb-sweep.yaml"
SAMPLED = {"optim.max_lr": 0.02, "optim.weight_decay": 1e-05, "data.batch_size": 64}


def test_override_forms():
    argv = ["--optim.max_lr=0.02", "--out=runs/x", "--data", "d", "model.widths=[8, 16]",
            "--model.widths=[64, 128]", "--log.tags=['a', 'b']", "--resume=auto"]
    assert override_forms(argv) == [
        "optim.max_lr=0.02", "--out=runs/x", "--data", "d", "model.widths=[8, 16]",
        "model.widths=[64, 128]", "log.tags=['a', 'b']", "--resume=auto"]


def test_cli_reads_both_agent_forms(tiny_recipe):
    args = sweep_utils.create_sweep_command_args(
        {"args": {"optim.max_lr": {"value": 0.02}, "model.widths": {"value": [8, 16, 16, 32]},
                  "augment.hflip": {"value": False}}})
    for form in ("args", "args_no_hyphens"):
        out = run_shardtrain(["train", "--recipe", tiny_recipe, "--print-config", *args[form]])
        cfg = yaml.safe_load(out.stdout)
        assert (cfg["optim"]["max_lr"], cfg["model"]["widths"], cfg["augment"]["hflip"]) == (
            0.02, [8, 16, 16, 32], False), form


def test_example_sweep_yaml_is_a_valid_sweep_over_real_config_keys():
    sweep = sweep_utils.load_sweep_config(str(SWEEP_YAML))  # how `wandb sweep` reads it
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}
    assert set(sweep["parameters"]) == set(SAMPLED)
    command = sweep["command"]
    assert command[:3] == ["${env}", "accelerate", "launch"] and command[-1] == "${args}"
    recipe = next(c.split("=", 1)[1] for c in command if c.startswith("--recipe="))
    for key, spec in sweep["parameters"].items():
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            load_config(recipe, [f"{key}={value}"])  # every sampled value is a valid override


def agent_command(sweep: dict, data: Path, recipe: Path, form: str) -> list[str]:
    """The sweep's `command:` as the agent expands it, from `train` on (the `accelerate launch`
    prefix is the test's own CPU launcher), on the test's data and recipe, 1 epoch."""
    tail = sweep["command"][sweep["command"].index("shardtrain") + 1:]
    args = sweep_utils.create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in SAMPLED.items()}})
    fixed = {"--recipe": f"--recipe={recipe}", "--data": f"--data={data}"}
    out = []
    for token in tail:
        if token == "${args}":
            out += args[form]
        elif token.startswith("train.epochs="):
            out.append("train.epochs=1")
        else:
            out.append(fixed.get(token.split("=")[0], token))
    return out


def test_agent_run_adopts_the_agents_run_id_and_resumes_it(learnable_shards, tiny_recipe,
                                                           tmp_path):
    sweep = sweep_utils.load_sweep_config(str(SWEEP_YAML))
    param_file = tmp_path / "wandb" / "sweep-sw42" / "config-agentrun1.yaml"
    config_util.save_config_file_from_dict(  # what the agent writes before starting the run
        str(param_file), {k: {"value": v} for k, v in SAMPLED.items()})
    env = {"WANDB_SWEEP_ID": "sw42", "WANDB_RUN_ID": "agentrun1",
           "WANDB_SWEEP_PARAM_PATH": str(param_file),
           "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    command = agent_command(sweep, learnable_shards, tiny_recipe, "args")
    result = run_shardtrain(command + ["log.wandb=true"], nproc=2, env=env, cwd=tmp_path)
    out = tmp_path / "runs" / "sweep-sw42" / "agentrun1"  # the default run folder under an agent
    final = read_json(out / "final.json")
    assert final["wandb_run_id"] == "agentrun1"
    assert "W&B run id agentrun1 (assigned by W&B" in result.stderr
    trainer = json.loads((out / "checkpoints" / "step-000003" / "trainer.json").read_text())
    assert trainer["state"]["wandb_id"] == "agentrun1"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["optim"]["max_lr"], cfg["optim"]["weight_decay"], cfg["data"]["batch_size"]) == (
        0.02, 1e-05, 64)
    (folder,) = find_offline_runs(out / "wandb")
    assert folder.name.endswith("-agentrun1")
    run = read_offline_runs_by_id(out / "wandb", "agentrun1", wait_seconds=10)
    assert run.config["optim.max_lr"] == 0.02 and run.config["optim"]["max_lr"] == 0.02

    # resumed later by hand (no agent), the other argument form: the same W&B run continues
    command = agent_command(sweep, learnable_shards, tiny_recipe, "args_no_hyphens")
    command = [c if c != "train.epochs=1" else "train.epochs=2" for c in command]
    run_shardtrain(command + ["log.wandb=true", "--out", out, "--resume", "auto"],
                   env={"PYTHONPATH": env["PYTHONPATH"]}, cwd=tmp_path)
    final = read_json(out / "final.json")
    assert final["wandb_run_id"] == "agentrun1" and final["steps"] == 6
    run = read_offline_runs_by_id(out / "wandb", "agentrun1", wait_seconds=10)
    assert len(run.paths) == 2 and run.exited
    assert [r["_step"] for r in run.history if "val/acc" in r] == [3, 6]


def test_slurm_agent_script_runs_one_agent_with_the_gpus_and_a_port(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "args: $*"\necho "gpus=$SHARDTRAIN_GPUS '
                    'port=$SHARDTRAIN_PORT cwd=$(pwd)"\n')
    fake.chmod(0o755)
    env = {**os.environ, "SHARDTRAIN_PYTHON": str(fake), "SLURM_JOB_ID": "1234",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(ROOT),
           "SHARDTRAIN_AGENT_COUNT": "2"}
    script = ROOT / "slurm" / "wandb-agent.sbatch"
    out = subprocess.run(["bash", script, "me/proj/sw42"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "args: -m wandb agent --count 2 me/proj/sw42" in out
    assert f"gpus=4 port=21234 cwd={ROOT}" in out
    bad = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr


def wandb_mode(home: Path, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC")}
    env.update(HOME=str(home), **extra)
    code = "from shardtrain.tracking.wandb_run import wandb_mode_from_env as m; print(m())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=home)
    return out.stdout.strip()


def test_self_hosted_login_counts_as_credentials(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert wandb_mode(home) == "offline"  # no credentials anywhere
    wandb = Path(sys.executable).with_name("wandb")
    subprocess.run([wandb, "login", "--no-verify", "--host", "https://wandb.example.com",
                    "a" * 40], env={**os.environ, "HOME": str(home)}, check=True,
                   capture_output=True)
    assert "machine wandb.example.com" in (home / ".netrc").read_text()
    assert wandb_mode(home) == "online"  # the netrc entry of the server wandb talks to
    # credentials for another server than the configured one do not count
    assert wandb_mode(home, WANDB_BASE_URL="https://other.example.org") == "offline"
    assert wandb_mode(home, WANDB_MODE="disabled") == "disabled"


def test_run_banner_prints_the_url_online_only(tmp_path):
    online = SimpleNamespace(offline=False, url="https://wandb.example.com/me/p/runs/ab12",
                             name="r1", id="ab12")
    assert run_banner(online, tmp_path) == "W&B run r1: https://wandb.example.com/me/p/runs/ab12"
    offline = SimpleNamespace(offline=True, url=None, name="r1", id="ab12")
    assert "(offline)" in run_banner(offline, tmp_path) and "wandb sync" in run_banner(
        offline, tmp_path)
