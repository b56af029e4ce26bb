"""Backend health decisions: active probe verdicts and passive outlier ejection. Pure.

The supervisor feeds in probe results and, every tick, the request outcomes workers counted in
the stats segment; these functions say what each backend's state becomes. Workers only count
(Envoy's split: counting on the data plane, deciding on the main thread).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from apirouter.config import ServerConfig
from apirouter.table import EJECTED, HEALTHY, UNHEALTHY


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    consecutive_failures: int = 5
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    max_ejected_percent: int = 50

    @classmethod
    def from_server(cls, s: ServerConfig) -> HealthPolicy:
        return cls(s.healthy_threshold, s.unhealthy_threshold, s.outlier_consecutive_failures,
                   s.outlier_base_ejection_s, s.outlier_max_ejection_s,
                   s.outlier_max_ejected_percent)


@dataclass(frozen=True, slots=True)
class BackendHealth:
    probe_ok: bool = True  # the active checks' verdict
    streak: int = 0  # consecutive probe results against the current verdict
    consecutive_failures: int = 0  # requests failed in a row, all workers together
    ejected_until: float = 0.0
    ejections: int = 0  # how many times in a row it was ejected (ejection time grows)


def state(h: BackendHealth, now: float) -> str:
    if h.ejected_until > now:
        return EJECTED
    return HEALTHY if h.probe_ok else UNHEALTHY


def after_probe(h: BackendHealth, ok: bool, p: HealthPolicy) -> BackendHealth:
    """A verdict flips only after ``threshold`` consecutive results that disagree with it."""
    if ok == h.probe_ok:
        return replace(h, streak=0) if h.streak else h
    streak = h.streak + 1
    needed = p.healthy_threshold if ok else p.unhealthy_threshold
    if streak >= needed:
        return replace(h, probe_ok=ok, streak=0,
                       consecutive_failures=0 if ok else h.consecutive_failures)
    return replace(h, streak=streak)


def after_traffic(h: BackendHealth, successes: int, failures: int) -> BackendHealth:
    """Outcomes since the last tick. Any success breaks the run of failures (order within one
    tick is unknown, so a mixed tick counts as recovered)."""
    if successes:
        return replace(h, consecutive_failures=0) if h.consecutive_failures else h
    if failures:
        return replace(h, consecutive_failures=h.consecutive_failures + failures)
    return h


def eject_outliers(states: dict[str, BackendHealth], now: float,
                   p: HealthPolicy) -> dict[str, BackendHealth]:
    """Eject backends over the failure threshold, never more than the allowed share; forget
    past ejections once a backend has stayed in for ``max_ejection_s``."""
    out = dict(states)
    total = len(states)
    allowed = (total * p.max_ejected_percent) // 100
    ejected = sum(1 for h in states.values() if h.ejected_until > now)
    for bid in sorted(states, key=lambda b: -states[b].consecutive_failures):
        h = out[bid]
        if h.ejected_until <= now:
            if h.ejections and now - h.ejected_until > p.max_ejection_s:
                h = out[bid] = replace(h, ejections=0)
            if h.consecutive_failures >= p.consecutive_failures and ejected < allowed:
                duration = min(p.base_ejection_s * 2 ** h.ejections, p.max_ejection_s)
                out[bid] = replace(h, ejected_until=now + duration, ejections=h.ejections + 1,
                                   consecutive_failures=0)
                ejected += 1
    return out
