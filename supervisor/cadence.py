"""The supervisor's periodic work wakes on one grid of the event loop's clock.

An idle supervisor spends its CPU on waking up: measured on the 2-core test VM, one wake-up
of a uvloop task that only sleeps costs ~230 µs of CPU (the kernel's and the hypervisor's
share of leaving and re-entering the epoll wait, and Python's code run cold again), more
than the usage drain's poll or the passive health tick does once awake. Each loop sleeping
its own period from the end of its own work drifted apart from the others: the drain's poll
(every 50 ms) and the health tick (every 100 ms) woke the process 30 times a second, a
timer a millisecond or two after the other. Sleeping to the next multiple of the period
instead puts timers whose periods divide one another on the same instants; uvloop runs
every timer due at an instant in one pass, so they share a wake-up. The periods stay what
they were; only their phase is common.
"""

from __future__ import annotations

import asyncio
import math

# The loop's clock has millisecond steps (uvloop): a grid point nearer than this is the one
# just reached, not the next one (sleeping to it would wake again at once).
_REACHED_S = 0.0005


def until_next(period_s: float, now: float) -> float:
    """Seconds from ``now`` to the next multiple of ``period_s`` on the loop's clock."""
    due = (math.floor((now + _REACHED_S) / period_s) + 1) * period_s
    return due - now


async def beat(period_s: float) -> None:
    """Sleep to the next multiple of ``period_s``: wake up with the other periodic work."""
    await asyncio.sleep(until_next(period_s, asyncio.get_running_loop().time()))
