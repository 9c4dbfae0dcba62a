"""The repository stands on its own: no file points at paths users do not have, and the launcher
configs hold only settings that take effect.

Run: PYTHONPATH=src .venv/bin/python -m pytest tests/test_hygiene.py
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or not shutil.which("git"),
                    reason="not a git checkout")
def test_no_tracked_file_points_outside_the_repository():
    # assembled here so that this file does not match itself
    outside = "|".join([r"\.\./" + "shared", "/" + "shared/", "/" + "work/", "PIT" + "FALLS"])
    r = subprocess.run(["git", "grep", "-nIE", outside], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1 and not r.stdout, f"paths outside the repository:\n{r.stdout}"


@pytest.mark.parametrize("config", sorted((ROOT / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_set_no_precision_the_trainer_would_override(config):
    """The trainer passes train.precision to Accelerator, which beats the launcher's
    mixed_precision: a value here would claim something that does not happen."""
    settings = yaml.safe_load(config.read_text())
    assert not {"mixed_precision", "downcast_bf16"} & settings.keys(), config.name
