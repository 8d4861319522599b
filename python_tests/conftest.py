"""Shared pytest setup: the ``device`` fixture, and a guard against runs where nothing passed."""

from __future__ import annotations

import pytest
import torch

_PASSED = {"count": 0, "none_passed": False}


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Every test that takes ``device`` runs on CPU, and on CUDA when a GPU is present."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(request.param)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _PASSED["count"] += 1


def pytest_sessionfinish(session, exitstatus):
    """A run in which no test passed (none collected, or all skipped) fails instead of passing."""
    if exitstatus == pytest.ExitCode.OK and _PASSED["count"] == 0:
        _PASSED["none_passed"] = True
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def pytest_terminal_summary(terminalreporter, exitstatus):
    if _PASSED["none_passed"]:
        terminalreporter.write_line("error: no test passed (none ran, or all were skipped)", red=True)
