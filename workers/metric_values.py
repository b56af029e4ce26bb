"""Cheaper multiprocess metric writes for the worker's hot path.

prometheus_client's multiprocess value (``values.MultiProcessValue()``) takes a thread lock and
calls ``os.getpid()`` — a system call — on every ``inc``, to notice a fork. A proxied request
makes six such writes (two counters, two histograms of two writes each): about a tenth of the
worker's CPU per request. A worker is one thread, and it learns of a fork from
``os.register_at_fork``, so ``FastValue`` keeps the library's file format and bookkeeping and
only drops the lock and the per-call pid check: after a fork, the first write of each value goes
through the library's own ``inc`` (which re-opens the files of the new pid), later ones write
the value's 16 bytes into the mmap directly, as the library does (one slice assignment, never a
torn float: see prometheus_client.mmap_dict).

``install()`` must run before the first metric is created (workers.metrics calls it at import);
outside multiprocess mode it does nothing. ``observer()`` is the same for a histogram child's
``observe``: one bisect instead of a Python loop over the buckets (``many_observer()``: a list
of observations, each series written once); ``incrementer()`` for a counter child's ``inc``:
its value's write, without two more Python calls around it.

These use prometheus_client internals (``_file``, ``_key``, ``_value``, ``_positions``, ``_m``,
``_upper_bounds``, ``_buckets``, ``_sum``): tests/workers/test_metric_values.py fails if a
prometheus_client upgrade changes them.
"""

from __future__ import annotations

import bisect
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import values

_PACK = struct.Struct("dd").pack
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def install() -> bool:
    """Use FastValue for every metric created from now on (multiprocess mode only)."""
    base = values.ValueClass
    if not getattr(base, "_multiprocess", False) or getattr(base, "_fast", False):
        return getattr(base, "_fast", False)

    class FastValue(base):  # type: ignore[valid-type, misc]
        _fast = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fast_pid = _pid

        def inc(self, amount: float) -> None:
            if self._fast_pid != _pid:  # first write since a fork: the library re-opens files
                super().inc(amount)
                self._fast_pid = _pid
                return
            self._value += amount
            self._timestamp = 0.0
            f = self._file
            pos = f._positions[self._key]
            f._m[pos:pos + 16] = _PACK(self._value, 0.0)

    values.ValueClass = FastValue
    return True


def incrementer(child: Any) -> Callable[[float], None]:
    """``child.inc`` of a counter (labelled child or unlabelled counter) without the library's
    per-call checks (observability, sign): the value's own ``inc``, for amounts known >= 0."""
    return child._value.inc


def many_observer(child: Any) -> Callable[[Sequence[float]], None]:
    """``observer`` for a list of observations at once (one or more): the sum written once,
    and each bucket once with how many fell in it. Found by C where it can: when the least
    and the greatest fall in one bucket all do (a turn's latencies, often), else each
    bucket's count is a bisection of the sorted observations (a loop over the buckets they
    span, not over the observations).
    """
    bounds = list(child._upper_bounds)
    buckets = child._buckets
    total = child._sum
    find = bisect.bisect_left
    upto = bisect.bisect_right

    def observe_all(amounts: Sequence[float]) -> None:
        total.inc(sum(amounts))
        first = find(bounds, min(amounts))
        last = find(bounds, max(amounts))
        if first == last:
            buckets[first].inc(len(amounts))
            return
        ordered = sorted(amounts)
        below = 0
        for i in range(first, last + 1):
            # An observation falls in the first bucket whose bound is >= it (le inclusive).
            up = upto(ordered, bounds[i])
            if up > below:
                buckets[i].inc(up - below)
                below = up

    return observe_all


def observer(child: Any) -> Callable[[float], None]:
    """``child.observe`` of a histogram (a labelled child or an unlabelled histogram)."""
    bounds = list(child._upper_bounds)
    buckets = child._buckets
    total = child._sum
    find = bisect.bisect_left

    def observe(amount: float) -> None:
        total.inc(amount)
        buckets[find(bounds, amount)].inc(1)

    return observe
