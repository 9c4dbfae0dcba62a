"""SHARDTRAIN_ALLOWED_SKIPS=FILE: a skipped test fails the run unless FILE allows it (CI sets it).

A skip exits 0, so a suite whose data or optional package went missing would stay green while
testing nothing. With the variable set, every skip (a test, or a whole module at collection)
must match an entry of FILE (relative to the repository root), one a line, `#` starts a comment:
    marker:gpu                          # any test carrying @pytest.mark.gpu
    tests/test_x.py::test_y*            # node ids, fnmatch globs
Without it skips behave as usual (a laptop without CUDA or the FashionMNIST package).
An environment variable rather than a command-line option: pytest reads options before it
loads tests/conftest.py when it is started without paths (`make test` runs plain `pytest`).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

ENV = "SHARDTRAIN_ALLOWED_SKIPS"


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get(ENV)
    if path:
        allowed = read_allowed(Path(config.rootpath, path))
        config.pluginmanager.register(SkipGuard(allowed), "skip_guard")


def read_allowed(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


class SkipGuard:
    def __init__(self, allowed: list[str]):
        self.markers = {a[len("marker:"):] for a in allowed if a.startswith("marker:")}
        self.globs = [a for a in allowed if not a.startswith("marker:")]
        self.unexpected: list[str] = []

    def allowed(self, report) -> bool:
        keywords = getattr(report, "keywords", {}) or {}
        return (any(m in keywords for m in self.markers)
                or any(fnmatch.fnmatch(report.nodeid, g) for g in self.globs))

    def note(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not self.allowed(report):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            self.unexpected.append(f"{report.nodeid}: {reason}")

    def pytest_runtest_logreport(self, report) -> None:
        self.note(report)

    def pytest_collectreport(self, report) -> None:  # a module skipped at import
        self.note(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.unexpected:
            terminalreporter.section("skips not on the allow-list (they fail this run)", red=True)
            for line in self.unexpected:
                terminalreporter.write_line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.unexpected and exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
