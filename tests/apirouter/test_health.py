from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from apirouter.health import (
    BackendHealth,
    HealthPolicy,
    after_probe,
    after_traffic,
    eject_outliers,
    state,
)

P = HealthPolicy(healthy_threshold=2, unhealthy_threshold=3, consecutive_failures=5,
                 base_ejection_s=5, max_ejection_s=60, max_ejected_percent=50)


def probes(results: list[bool]) -> BackendHealth:
    h = BackendHealth()
    for ok in results:
        h = after_probe(h, ok, P)
    return h


def test_probe_verdicts_need_consecutive_results() -> None:
    assert probes([False, False]).probe_ok
    assert not probes([False, False, False]).probe_ok
    assert probes([False, False, True, False, False]).probe_ok  # a good probe resets the run
    assert not probes([False] * 3 + [True]).probe_ok
    assert probes([False] * 3 + [True, True]).probe_ok


def test_traffic_failures_accumulate_until_a_success() -> None:
    h = after_traffic(after_traffic(BackendHealth(), 0, 3), 0, 1)
    assert h.consecutive_failures == 4
    assert after_traffic(h, 1, 7).consecutive_failures == 0


def test_ejection_grows_and_expires() -> None:
    states = {"a": BackendHealth(consecutive_failures=5), "b": BackendHealth()}
    s = eject_outliers(states, 100.0, P)
    assert state(s["a"], 100.0) == "ejected" and s["a"].ejected_until == 105.0
    assert state(s["a"], 105.0) == "healthy"
    s["a"] = after_traffic(s["a"], 0, 5)
    s = eject_outliers(s, 106.0, P)
    assert s["a"].ejected_until == 116.0 and s["a"].ejections == 2  # doubled
    s = eject_outliers(s, 116.0 + 61, P)
    assert s["a"].ejections == 0  # forgiven after staying in for max_ejection_s


@given(st.lists(st.integers(0, 20), min_size=1, max_size=12), st.integers(0, 100))
def test_never_more_than_the_allowed_share_is_ejected(failures: list[int], percent: int) -> None:
    p = HealthPolicy(consecutive_failures=5, max_ejected_percent=percent)
    states = {str(i): BackendHealth(consecutive_failures=f) for i, f in enumerate(failures)}
    out = eject_outliers(states, 0.0, p)
    ejected = [b for b, h in out.items() if state(h, 0.0) == "ejected"]
    assert len(ejected) <= len(states) * percent // 100
    assert all(states[b].consecutive_failures >= 5 for b in ejected)
    eligible = sum(1 for f in failures if f >= 5)
    assert len(ejected) == min(eligible, len(states) * percent // 100)
