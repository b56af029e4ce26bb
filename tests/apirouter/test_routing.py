from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apirouter.config import parse_config
from apirouter.routing import Decision, NoBackend, choose, failover_order, pick_weighted
from apirouter.table import HEALTHY, Override, Route, RoutingTable, compile_table

weights = st.lists(st.integers(0, 100), min_size=1, max_size=10).filter(any)


@given(weights, st.floats(0, 1, exclude_max=True))
def test_pick_lands_on_a_positive_weight(ws: list[int], r: float) -> None:
    route = Route("m", tuple(str(i) for i in range(len(ws))), tuple(ws))
    i = pick_weighted(route.cumulative, r)
    assert ws[i] > 0


@given(weights)
def test_top_of_range_never_picks_a_zero_weight(ws: list[int]) -> None:
    route = Route("m", tuple(str(i) for i in range(len(ws))), tuple(ws))
    assert ws[pick_weighted(route.cumulative, 0.9999999999999999)] > 0
    assert ws[pick_weighted(route.cumulative, 0.0)] > 0


@given(weights)
def test_each_target_owns_a_share_proportional_to_its_weight(ws: list[int]) -> None:
    # Walk r over a fine uniform grid: every target's hit count matches its weight share.
    route = Route("m", tuple(str(i) for i in range(len(ws))), tuple(ws))
    n = 10_000
    hits = Counter(pick_weighted(route.cumulative, k / n) for k in range(n))
    total = sum(ws)
    for i, w in enumerate(ws):
        assert abs(hits[i] - n * w / total) <= len(ws) + 1


def table(models: dict[str, dict[str, object]], health: dict[str, str] | None = None,
          overrides: tuple[Override, ...] = ()) -> RoutingTable:
    backends = {b: f"http://h:{i + 1}" for i, b in enumerate("abcdef")}
    return compile_table(parse_config({"backends": backends, "models": models}), source="t",
                         health=health, overrides=overrides)


def test_single_backend_is_primary_and_several_are_weighted() -> None:
    t = table({"one": {"backends": ["a"]},
               "two": {"backends": [{"backend": "a", "weight": 3}, "b"]}})
    assert choose(t, t.routes["one"], 0.5) == ("a", Decision.PRIMARY)
    rng = random.Random(7)
    seen = Counter(choose(t, t.routes["two"], rng.random())[0] for _ in range(20_000))
    assert 0.73 < seen["a"] / 20_000 < 0.77


def test_unhealthy_backends_are_skipped_and_fallbacks_follow() -> None:
    t = table({"m": {"backends": ["a", "b"], "fallbacks": ["f"]}, "f": {"backends": ["c"]}},
              health={"a": "ejected"})
    assert {choose(t, t.routes["m"], r / 10)[0] for r in range(10)} == {"b"}
    assert failover_order(t, t.routes["m"], ["b"]) == [("c", "f"), ("a", "m")]


def test_all_own_backends_out_means_failover_to_the_fallback_model() -> None:
    t = table({"m": {"backends": ["a"], "fallbacks": ["f"]}, "f": {"backends": ["c"]}},
              health={"a": "unhealthy"})
    assert choose(t, t.routes["m"], 0.1) == ("c", Decision.FAILOVER)


def test_pin_overrides_and_draining_is_never_chosen() -> None:
    t = table({"m": {"backends": ["a", "b"]}}, overrides=(Override("pin", "m", backend="b"),))
    assert choose(t, t.routes["m"], 0.0) == ("b", Decision.OVERRIDE)
    t = table({"m": {"backends": ["a", "b"]}}, overrides=(Override("drain", "a"),))
    assert {choose(t, t.routes["m"], r / 10)[0] for r in range(10)} == {"b"}
    t = table({"m": {"backends": ["a"]}}, overrides=(Override("drain", "a"),))
    with pytest.raises(NoBackend):
        choose(t, t.routes["m"], 0.3)


def test_least_inflight_and_latency_strategies() -> None:
    t = table({"m": {"backends": ["a", "b", "c"], "strategy": "least_inflight"},
               "l": {"backends": ["a", "b", "c"], "strategy": "latency"}})
    idx = {b: t.backends[b].index for b in "abc"}
    inflight = [0] * 8
    inflight[idx["a"]], inflight[idx["b"]], inflight[idx["c"]] = 5, 1, 3
    assert choose(t, t.routes["m"], 0.9, inflight=inflight)[0] == "b"
    latency = [0.0] * 8
    latency[idx["a"]], latency[idx["b"]], latency[idx["c"]] = 9.0, 30.0, 4.0
    assert choose(t, t.routes["l"], 0.9, latency=latency)[0] == "c"


states = st.sampled_from(["healthy", "unhealthy", "ejected", "degraded", "draining"])


@given(st.dictionaries(st.sampled_from("abcdef"), states),
       st.lists(st.sampled_from("abcdef"), unique=True, max_size=3),
       st.floats(0, 1, exclude_max=True))
def test_failover_order_properties(health: dict[str, str], tried: list[str], r: float) -> None:
    t = table({"m": {"backends": ["a", "b", "c"], "fallbacks": ["f1"]},
               "f1": {"backends": ["c", "d"], "fallbacks": ["f2"]},
               "f2": {"backends": ["e", "f", "a"]}}, health=health)
    order = failover_order(t, t.routes["m"], tried)
    backends = [b for b, _ in order]
    assert len(backends) == len(set(backends))
    assert not set(backends) & set(tried)
    assert all(t.state(b) != "draining" for b in backends)
    rank = {"healthy": 0, "degraded": 1, "unhealthy": 2, "ejected": 2}
    assert [rank[t.state(b)] for b in backends] == sorted(rank[t.state(b)] for b in backends)
    every = {b for b in "abcdef" if t.state(b) != "draining"}
    assert set(backends) == every - set(tried)
    try:
        first, _ = choose(t, t.routes["m"], r)
    except NoBackend:
        assert not every
        return
    assert t.state(first) != "draining"
    if any(t.state(b) == HEALTHY for b in "abc"):
        assert first in "abc" and t.state(first) == HEALTHY
