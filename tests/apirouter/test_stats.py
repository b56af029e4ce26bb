"""A worker's stats slot as the supervisor reads it: in-flight, outcomes, latency EWMA."""

from __future__ import annotations

import os
import time

import pytest

from apirouter.shm import segment_name, unlink
from apirouter.stats import EWMA_ALPHA, StatsReader, WorkerStats, create_stats_segment


@pytest.fixture
def slot(tmp_path):
    name = segment_name(str(os.getpid()), f"st{time.monotonic_ns()}")
    shm = create_stats_segment(name, 2, 3)
    w = WorkerStats(name, str(tmp_path))
    try:
        yield w, StatsReader(shm)
    finally:
        w.close()
        shm.close()
        unlink(name)


def test_an_attempt_is_in_flight_until_it_ends_and_counts_its_outcome(slot) -> None:
    w, reader = slot
    w.begin(1)
    w.begin(1)
    w.begin(2)
    (view,) = reader.read()
    assert list(view.inflight) == [0, 2, 1]
    w.end(1, True, 10.0)
    w.end(2, False, 99.0)
    (view,) = reader.read()
    assert list(view.inflight) == [0, 1, 0]
    assert (list(view.successes), list(view.failures)) == ([0, 1, 0], [0, 0, 1])
    assert list(view.latency_ms) == [0.0, 10.0, 0.0]  # a failure's latency is not averaged
    w.end(1, True, 20.0)
    (view,) = reader.read()
    assert view.inflight[1] == 0
    assert view.latency_ms[1] == pytest.approx(10.0 + EWMA_ALPHA * (20.0 - 10.0))


def test_in_flight_never_goes_below_zero(slot) -> None:
    # A slot re-claimed mid-request restarts at zero: a later end or abandon must not wrap.
    w, reader = slot
    w.end(0, True, 1.0)
    w.abandon(0)
    w.begin(0)
    w.abandon(0)
    w.abandon(0)
    (view,) = reader.read()
    assert view.inflight[0] == 0
    assert (view.successes[0], view.failures[0]) == (1, 0)  # abandon is neither
