"""The thread count a fit computes with: fixed by the environment, or the cores that other processes
leave free."""

from __future__ import annotations

import sys

import pytest
import torch

from defungi.train import runtime
from defungi.train.runtime import THREADS_ENV, Threads


@pytest.fixture(autouse=True)
def _keep_threads(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _scripted(threads: Threads, samples: list[tuple[float, float, float]]) -> None:
    """Replace the machine's readings (wall s, busy CPU s of the cores, this process's CPU s) by samples."""
    readings = iter(samples)
    threads._sample = lambda: next(readings)  # type: ignore[method-assign]
    threads.since = threads._sample()


@pytest.mark.parametrize(
    ("others", "expected"),
    [(0.0, 4), (0.3, 4), (0.9, 3), (2.2, 2), (7.0, 1)],
)
def test_threads_leave_the_cores_that_others_keep_busy(others: float, expected: int):
    threads = Threads(torch.device("cpu"))
    threads.cpus = {0, 1, 2, 3}
    own = 1.5  # this process's CPU seconds over the interval: not counted as others'
    _scripted(threads, [(0.0, 0.0, 0.0), (2.0, own + 2.0 * others, own)])
    assert threads.choose() == expected == torch.get_num_threads()


def test_a_fixed_number_is_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(THREADS_ENV, "1")
    threads = Threads(torch.device("cpu"))
    threads.cpus = {0, 1, 2, 3}
    _scripted(threads, [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0)])
    assert threads.choose() == 1 == torch.get_num_threads()


def test_not_on_a_gpu():
    before = torch.get_num_threads()
    threads = Threads(torch.device("cuda"))
    _scripted(threads, [(0.0, 0.0, 0.0), (1.0, 10.0, 0.0)])
    assert threads.choose() == before == torch.get_num_threads()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_busy_seconds_count_this_process_work():
    cpus = Threads(torch.device("cpu")).cpus
    before = runtime._busy_seconds(cpus)
    total = 0
    for i in range(3_000_000):
        total += i
    assert runtime._busy_seconds(cpus) > before
