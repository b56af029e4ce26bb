"""The supervisor's periodic work shares wake-ups: sleeps end on multiples of their period."""

from __future__ import annotations

import asyncio
import math

import pytest

from supervisor.cadence import beat, until_next


def test_the_next_grid_point_is_ahead_even_when_the_clock_is_on_one() -> None:
    assert until_next(0.1, 12.34) == pytest.approx(0.06)
    assert until_next(0.05, 12.34) == pytest.approx(0.01)
    # On a grid point (or a float's breadth before it): the next one, not a zero sleep.
    assert until_next(0.1, 12.3) == pytest.approx(0.1)
    assert until_next(0.1, 12.3 - 1e-12) == pytest.approx(0.1)


async def test_periods_that_divide_one_another_wake_at_the_same_instants() -> None:
    loop = asyncio.get_running_loop()
    woke: dict[float, list[float]] = {0.05: [], 0.1: []}

    async def every(period: float, times: int) -> None:
        for _ in range(times):
            await beat(period)
            woke[period].append(loop.time())

    await asyncio.gather(every(0.05, 4), every(0.1, 2))
    # Which 0.05 s grid point each wake-up was for (a wake-up may come a little late).
    fast = [math.floor((t + 0.001) / 0.05) for t in woke[0.05]]
    slow = [math.floor((t + 0.001) / 0.05) for t in woke[0.1]]
    assert all(i % 2 == 0 and i in fast for i in slow)
