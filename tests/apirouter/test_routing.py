from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from apirouter.routing import Decision, choose_backend, pick_weighted
from apirouter.table import Route

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


def test_single_backend_is_primary_and_several_are_weighted() -> None:
    assert choose_backend(Route("m", ("a",), (1,)), 0.5) == ("a", Decision.PRIMARY)
    rng = random.Random(7)
    route = Route("m", ("a", "b"), (3, 1))
    seen = Counter(choose_backend(route, rng.random())[0] for _ in range(20_000))
    assert 0.73 < seen["a"] / 20_000 < 0.77
