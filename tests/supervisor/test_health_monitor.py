"""The passive tick: per-backend outcomes summed over every worker's stats slot."""

from __future__ import annotations

import os
import time

from apirouter.health import HealthPolicy
from apirouter.shm import segment_name, unlink
from apirouter.stats import StatsReader, WorkerStats, create_stats_segment
from apirouter.table import Backend
from supervisor.health_monitor import HealthMonitor


def _backend(bid: str, index: int) -> Backend:
    return Backend(bid, "http", "127.0.0.1", 9, "", None, index, "")


def test_the_tick_counts_each_configured_backend_over_all_slots_and_restarts(tmp_path) -> None:
    name = segment_name(str(os.getpid()), f"hm{time.monotonic_ns()}")
    shm = create_stats_segment(name, 4, 8)
    workers = []
    try:
        w1, w2 = WorkerStats(name, str(tmp_path)), WorkerStats(name, str(tmp_path))
        workers += [w1, w2]
        changes: list[int] = []
        mon = HealthMonitor(StatsReader(shm), lambda: changes.append(1))
        mon.configure({"a": _backend("a", 2), "b": _backend("b", 5)},
                      HealthPolicy(consecutive_failures=6), 2.0, 1.0)
        for w in (w1, w2):
            w.end(5, False, 0.0)
            w.end(5, False, 0.0)
            w.end(7, False, 0.0)  # an index no configured backend has: not counted
        w1.end(2, True, 1.0)
        mon.tick(time.time())
        assert mon.live_workers == [os.getpid(), os.getpid()]
        assert (mon.health["a"].consecutive_failures, mon.health["b"].consecutive_failures) \
            == (0, 4)
        mon.tick(time.time())  # nothing new: deltas, not totals
        assert mon.health["b"].consecutive_failures == 4

        # w1 goes; its slot is claimed again (counters restart at zero, same pid here): a
        # drop counts from zero, so the new worker's one failure is one more.
        slot = w1.slot
        w1.close()
        workers.remove(w1)
        w3 = WorkerStats(name, str(tmp_path))
        workers.append(w3)
        assert w3.slot == slot
        w3.end(5, False, 0.0)
        mon.tick(time.time())
        assert mon.health["b"].consecutive_failures == 5
        assert not changes

        w2.end(5, False, 0.0)  # the sixth in a row: ejected (one of two backends: 50%)
        mon.tick(time.time())
        assert mon.states()["b"] == "ejected"
        assert changes
        w2.end(2, True, 1.0)
        mon.tick(time.time())
        assert mon.health["a"].consecutive_failures == 0
    finally:
        for w in workers:
            w.close()
        shm.close()
        unlink(name)
