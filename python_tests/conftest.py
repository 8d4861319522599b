"""Shared pytest setup: one CPU thread per test module, the ``device`` fixture, and a guard against runs
where nothing passed."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_tokenizer

_PASSED = {"count": 0, "none_passed": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other jobs for the cores; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """A word tokenizer with a chat template, covering the built-in tasks and the bundled data files."""
    return tiny_tokenizer()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
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
