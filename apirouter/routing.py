"""Routing decisions: pure functions from a table, a route and a random number to backends.

No I/O and no hidden randomness: callers pass ``r`` in [0, 1) and the worker's own counters,
so tests can drive every branch and property tests can check distributions and orderings.

Candidates come in tiers, each tried before the next:
  0. the operator's pin for the model (decision OVERRIDE)
  1. the model's healthy backends, first one chosen by the model's strategy
  2. the healthy backends of the model's fallback models, in chain order
  3. degraded backends (operator), then unhealthy or ejected ones ("panic": better a
     doubtful backend than a certain error)
Draining backends are never chosen.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from enum import StrEnum
from itertools import accumulate

from apirouter.table import DEGRADED, DRAINING, HEALTHY, Route, RoutingTable


class Decision(StrEnum):
    PRIMARY = "PRIMARY"  # the model's only backend
    WEIGHTED = "WEIGHTED"  # chosen by the strategy among several
    FAILOVER = "FAILOVER"  # an earlier candidate failed or is out of service
    OVERRIDE = "OVERRIDE"  # an operator pinned the model


# The members as module constants: a global read each, not a global and an attribute.
_PRIMARY, _WEIGHTED, _FAILOVER, _OVERRIDE = (Decision.PRIMARY, Decision.WEIGHTED,
                                             Decision.FAILOVER, Decision.OVERRIDE)


class NoBackend(Exception):
    """No backend may take this request (all draining, or no weight)."""


def pick_weighted(cumulative: Sequence[int], r: float) -> int:
    """Index of the target whose weight interval contains ``r * total``.

    Zero-weight targets own an empty interval and are never picked.
    """
    total = cumulative[-1]
    i = bisect_right(cumulative, r * total)
    if i < len(cumulative):
        return i
    # Float rounding put r * total on the very top: take the last target with weight.
    return bisect_left(cumulative, total)


def _pick(table: RoutingTable, route: Route, ids: Sequence[str], weights: Sequence[int],
          r: float, inflight: Sequence[int] | None, latency: Sequence[float] | None) -> str:
    if route.strategy == "least_inflight" and inflight is not None:
        return min(zip(ids, weights, strict=True),
                   key=lambda t: (inflight[table.backends[t[0]].index], -t[1]))[0]
    if route.strategy == "latency" and latency is not None:
        return min(zip(ids, weights, strict=True),
                   key=lambda t: (latency[table.backends[t[0]].index], -t[1]))[0]
    cumulative = route.cumulative if len(ids) == len(route.backend_ids) else tuple(
        accumulate(weights))
    return ids[pick_weighted(cumulative, r)]


def choose(table: RoutingTable, route: Route, r: float, inflight: Sequence[int] | None = None,
           latency: Sequence[float] | None = None) -> tuple[str, Decision]:
    """The first backend to try for ``route``."""
    pinned = route.pinned
    if pinned is not None and table.state(pinned) != DRAINING:
        return pinned, _OVERRIDE
    ids, weights = route.backend_ids, route.weights
    if not table.health:  # everything healthy: the common case, no filtering
        if len(ids) == 1 and weights[0]:  # (the model's one backend, as below: first)
            return ids[0], _PRIMARY
    else:
        health = table.health
        pairs = [(b, w) for b, w in zip(ids, weights, strict=True)
                 if w > 0 and health.get(b, HEALTHY) == HEALTHY]
        ids, weights = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if ids and any(weights):
        if len(route.backend_ids) == 1:
            return ids[0], _PRIMARY
        return _pick(table, route, ids, weights, r, inflight, latency), _WEIGHTED
    order = failover_order(table, route, ())
    if not order:
        raise NoBackend(route.model)
    return order[0][0], _FAILOVER


def failover_order(table: RoutingTable, route: Route,
                   tried: Sequence[str]) -> list[tuple[str, str]]:
    """(backend, model) pairs to try after ``tried``, best first; models differ for fallbacks."""
    seen = set(tried)
    tiers: tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]] = (
        [], [], [])
    for model in (route.model, *route.fallbacks):
        r = table.routes.get(model)
        if r is None:
            continue
        by_weight = sorted(zip(r.backend_ids, r.weights, strict=True), key=lambda t: -t[1])
        for backend, weight in by_weight:
            if backend in seen or weight <= 0:
                continue
            state = table.state(backend)
            if state == DRAINING:
                continue
            seen.add(backend)
            tier = 0 if state == HEALTHY else 1 if state == DEGRADED else 2
            tiers[tier].append((backend, model))
    return tiers[0] + tiers[1] + tiers[2]
