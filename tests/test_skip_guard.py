"""CI's SHARDTRAIN_ALLOWED_SKIPS: a skip not on the allow-list fails the run (skip_guard.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = '''
import pytest

def test_runs():
    pass

def test_missing_data():
    pytest.skip("dataset not installed")

@pytest.mark.gpu
def test_cuda():
    pytest.skip("no CUDA")
'''


def run_pytest(folder: Path, allowed: Path | None = None) -> subprocess.CompletedProcess:
    """pytest started without paths (as `make test` does), from `folder`."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SHARDTRAIN_ALLOWED_SKIPS", None)
    if allowed:
        env["SHARDTRAIN_ALLOWED_SKIPS"] = allowed.name  # relative to the root, as in .ci/run
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=folder, capture_output=True, text=True, env=env, timeout=120)


def test_a_skip_fails_the_run_unless_allowed(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(
        "from skip_guard import pytest_configure  # noqa: F401\n")
    (tmp_path / "tests" / "test_suite.py").write_text(SUITE)
    allowed = tmp_path / "allowed"
    allowed.write_text("# what may skip\nmarker:gpu  # no CUDA in CI\n")
    assert run_pytest(tmp_path).returncode == 0  # without the variable: skips are fine
    strict = run_pytest(tmp_path, allowed)
    assert strict.returncode == 1, strict.stdout
    assert "tests/test_suite.py::test_missing_data: Skipped: dataset not installed" in strict.stdout
    assert "test_cuda:" not in strict.stdout.split("skips not on the allow-list")[1]
    allowed.write_text("marker:gpu\n*::test_missing_data\n")
    assert run_pytest(tmp_path, allowed).returncode == 0
