"""Routing decisions: pure functions from a route and a random number to a backend.

No I/O and no hidden randomness: callers pass ``r`` in [0, 1), so tests can drive every
branch and property tests can check the distribution.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from enum import StrEnum

from apirouter.table import Route


class Decision(StrEnum):
    PRIMARY = "PRIMARY"  # the model has exactly one backend
    WEIGHTED = "WEIGHTED"  # chosen by weight among several
    FAILOVER = "FAILOVER"  # an earlier attempt failed; this is a later candidate
    OVERRIDE = "OVERRIDE"  # an operator pinned the model


def pick_weighted(cumulative: tuple[int, ...], r: float) -> int:
    """Index of the target whose weight interval contains ``r * total``.

    Zero-weight targets own an empty interval and are never picked.
    """
    total = cumulative[-1]
    i = bisect_right(cumulative, r * total)
    if i < len(cumulative):
        return i
    # Float rounding put r * total on the very top: take the last target with weight.
    return bisect_left(cumulative, total)


def choose_backend(route: Route, r: float) -> tuple[str, Decision]:
    ids = route.backend_ids
    if len(ids) == 1:
        return ids[0], Decision.PRIMARY
    return ids[pick_weighted(route.cumulative, r)], Decision.WEIGHTED
