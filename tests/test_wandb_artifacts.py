"""W&B model artifacts (latest / best versions), log.artifacts=false, and `--checkpoint wandb:...`
offline, read back from real offline runs (no server)."""

from __future__ import annotations

import pytest

from helpers import RUNS, read_json, run_shardtrain
from shardtrain.errors import UserError
from shardtrain.tracking.artifacts import resolve_checkpoint
from wandb_offline import read_offline_runs_by_id

pytestmark = RUNS  # real training subprocesses

pytest.importorskip("wandb")


def train(data, out, recipe, *args):
    run_shardtrain(["train", "--recipe", recipe, "--data", data, "--out", out, "log.wandb=true",
                    *args], timeout=240)
    final = read_json(out / "final.json")
    return final, read_offline_runs_by_id(out / "wandb", final["wandb_run_id"], wait_seconds=10)


def test_best_and_latest_are_separate_versions_when_the_weights_differ(
        learnable_shards, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    final, run = train(learnable_shards, out, tiny_recipe, "train.epochs=3",
                       "log.model_name=tiny model", "log.predictions=0", "log.plots=false")
    best, latest = out / "checkpoints" / "best.safetensors", out / "model.safetensors"
    # val acc reaches 1.0 at epoch 2 and stays there: best (epoch 2) is not the final weights
    assert best.read_bytes() != latest.read_bytes()
    models = [a for a in run.artifacts if a["type"] == "model"]
    # wandb adds `latest` to every version it logs and the server moves it to the newest one:
    # best first, then the final weights, which end up as `latest`
    assert [(a["name"], a["aliases"]) for a in models] == [("tiny-model", ["best", "latest"]),
                                                           ("tiny-model", ["latest"])]
    for artifact, weights in zip(models, (best, latest)):
        entry = artifact["files"]["model.safetensors"]
        assert open(entry["local_path"], "rb").read() == weights.read_bytes()
    assert models[0]["metadata"]["weights"] == "best"
    assert models[0]["metadata"]["val_acc"] == final["best_val_acc"]
    assert models[1]["metadata"]["weights"] == "final"
    assert models[1]["metadata"]["steps"] == final["steps"] == 36
    assert final["wandb_model"] == "tiny-model"
    keys = {m["key"] for m in run.media}  # log.predictions=0, log.plots=false
    assert "media/prediction_table" not in keys and "media/weights" not in keys


def test_artifacts_off(learnable_shards, tiny_recipe, tmp_path):
    final, run = train(learnable_shards, tmp_path / "run", tiny_recipe, "train.epochs=1",
                       "log.artifacts=false")
    assert not [a for a in run.artifacts if a["type"] in ("model", "dataset")]
    assert "wandb_model" not in final
    assert run.metrics["val/acc"]["summary"] == ["max"]  # the rest is still there


@pytest.mark.parametrize("command", [
    ["eval", "--data", "DATA"], ["predict", "x.png"], ["export", "--format", "onnx"]])
def test_wandb_checkpoint_offline_is_a_one_line_error(command, learnable_shards):
    args = [str(learnable_shards) if a == "DATA" else a for a in command]
    result = run_shardtrain([args[0], "--checkpoint", "wandb:me/shardtrain/model-x:best",
                             *args[1:]], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "shardtrain: error: --checkpoint wandb:me/shardtrain/model-x:best: downloading a W&B "
        "artifact needs W&B online (W&B is offline here: `wandb login`, or WANDB_MODE=online)"]


def test_local_checkpoints_pass_through(tmp_path):
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)


class FakeApi:
    """wandb.Api as resolve_checkpoint uses it online: artifact(name, type).download()."""
    calls: list = []
    folder = None

    def __init__(self, timeout=None):
        pass

    def artifact(self, name, type=None):
        FakeApi.calls.append((name, type))
        if name.startswith("me/p/missing"):
            raise ValueError("artifact membership 'missing' not found in 'me/p'\nmore detail")
        return self

    def download(self):
        return str(FakeApi.folder)


def test_wandb_checkpoint_online_downloads_the_model_artifact(tmp_path, monkeypatch):
    """No W&B server runs here: wandb.Api is replaced. Checked: the name asked for (alias
    `latest` by default, type `model`), the download folder returned, an API error in one line."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.calls, FakeApi.folder = [], tmp_path
    assert resolve_checkpoint("wandb:me/p/model-x:best") == str(tmp_path)
    assert resolve_checkpoint("wandb:me/p/model-x") == str(tmp_path)
    assert FakeApi.calls == [("me/p/model-x:best", "model"), ("me/p/model-x:latest", "model")]
    with pytest.raises(UserError) as e:
        resolve_checkpoint("wandb:me/p/missing:v3")
    assert str(e.value) == ("--checkpoint wandb:me/p/missing:v3: cannot download it from W&B: "
                            "ValueError: artifact membership 'missing' not found in 'me/p'")
