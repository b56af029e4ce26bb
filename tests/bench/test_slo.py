"""SLO evaluation and the scenarios' own checks, on made-up samples."""

from __future__ import annotations

import pytest

from bench.loadgen import WITHHELD, Sample
from bench.scenarios import budget_checks, failover_checks, rate_limit_checks
from bench.slo import PROJECT_SLOS, SEED_SLOS, evaluate, failed


def test_seed_and_project_columns() -> None:
    metrics = {"latency_p95_ms": 2999.0, "latency_p99_ms": 5001.0, "error_rate": 0.01,
               "overhead_p50_ms[vs direct]": 0.8, "overhead_p50_ms[router header]": 1.2,
               "overhead_p95_ms[vs direct]": None}
    v = {x.slo.id: x for x in evaluate(metrics)}
    assert v["seed.latency_p95"].passed is True
    assert v["seed.latency_p99"].passed is False
    assert v["seed.error_rate"].passed is False  # < 1 %: exactly 1 % fails
    assert v["seed.overhead_p50.vs_direct"].passed is True
    assert v["project.overhead_p50.vs_direct"].passed is True
    assert v["project.overhead_p50.router_header"].passed is False
    assert v["seed.overhead_p95.vs_direct"].passed is None  # not measured is not a pass
    assert "seed.ratelimit_decision" not in v  # no metric: not this scenario's SLO
    seed_fail = {x.slo.id for x in failed(v.values())}
    assert seed_fail == {"seed.latency_p99", "seed.error_rate"}
    both = {x.slo.id for x in failed(v.values(), ("seed", "project"))}
    assert both == seed_fail | {"project.overhead_p50.router_header"}


def test_the_seed_thresholds() -> None:
    limits = {s.id: (s.op, s.limit) for s in SEED_SLOS + PROJECT_SLOS}
    assert limits["seed.latency_p95"] == ("<=", 3000)
    assert limits["seed.latency_p99"] == ("<=", 5000)
    assert limits["seed.error_rate"] == ("<", 0.01)
    assert limits["seed.overhead_p50.vs_direct"] == ("<=", 150)
    assert limits["seed.overhead_p95.router_header"] == ("<=", 400)
    assert limits["seed.ratelimit_decision"] == ("<=", 5)
    assert limits["project.overhead_p50.vs_direct"] == ("<=", 1)
    assert limits["project.overhead_p99.router_header"] == ("<=", 5)


def _seq(statuses: list[int], gap: float = 0.1, latency: float = 0.01) -> list[Sample]:
    return [Sample(i, i * gap, latency=latency, status=st) for i, st in enumerate(statuses)]


def _by_id(verdicts: list) -> dict:  # type: ignore[type-arg]
    return {v.slo.id: v for v in verdicts}


def test_rate_limit_exact_bucket_passes() -> None:
    samples = _seq([200] * 10 + [429] * 5)
    for s in samples[10:]:
        s.retry_after, s.error = 1.0, "rate_limit_exceeded"
    v = _by_id(rate_limit_checks(samples, rpm=60, burst=10, fresh_bucket=True)[0])
    assert all(x.passed for x in v.values() if x.measured is not None)
    assert v["scenario.retry_after_honoured"].passed is None  # nobody waited


def test_rate_limit_over_admission_and_early_429_fail() -> None:
    over = _seq([200] * 20 + [429])  # 20 admitted in 2 s from a bucket of 10 + 1/s
    over[-1].retry_after = 1.0
    v = _by_id(rate_limit_checks(over, rpm=60, burst=10, fresh_bucket=True)[0])
    assert v["scenario.admitted_within_bucket"].passed is False
    early = _seq([200] * 3 + [429] + [200] * 2)
    v = _by_id(rate_limit_checks(early, rpm=60, burst=10, fresh_bucket=True)[0])
    assert v["scenario.no_early_429"].passed is False
    assert v["scenario.retry_after_present"].passed is False
    assert v["scenario.error_code"].passed is False
    v = _by_id(rate_limit_checks(early, rpm=60, burst=10, fresh_bucket=False)[0])
    assert "scenario.no_early_429" not in v  # a shared bucket's start is unknown


def test_rate_limit_retry_after_honoured() -> None:
    samples = _seq([200, 429, WITHHELD, 200, 429, WITHHELD, 429])
    samples[3].after_wait = samples[6].after_wait = True
    v = _by_id(rate_limit_checks(samples, rpm=60, burst=1, fresh_bucket=True)[0])
    assert v["scenario.retry_after_honoured"].measured == pytest.approx(0.5)
    assert v["scenario.retry_after_honoured"].passed is False


def _priced(statuses: list[int], usage: tuple[int, int] = (30, 10)) -> list[Sample]:
    samples = _seq(statuses, gap=0.1, latency=0.02)
    for s in samples:
        if s.status == 200:
            s.usage = usage
        elif s.status == 402:
            s.error = "budget_exceeded"
    return samples


def test_budget_refused_at_the_right_moment() -> None:
    # Each request costs (30 * 1 + 10 * 2) / 1000 = 0.05; reservation 0.2; budget 0.5.
    v = _by_id(budget_checks(_priced([200] * 8 + [402] * 4), 0.5, 1.0, 2.0, 0.2)[0])
    assert v["scenario.no_overspend"].passed is True  # 0.4 spent
    assert v["scenario.no_early_402"].passed is True  # 0.1 left < one reservation
    assert v["scenario.error_code"].passed is True


def test_budget_overspend_and_early_refusal_fail() -> None:
    v = _by_id(budget_checks(_priced([200] * 12 + [402]), 0.5, 1.0, 2.0, 0.2)[0])
    assert v["scenario.no_overspend"].passed is False  # 0.6 > 0.5
    v = _by_id(budget_checks(_priced([200] * 2 + [402] * 3), 0.5, 1.0, 2.0, 0.2)[0])
    assert v["scenario.no_early_402"].passed is False  # 0.4 unreserved, refused anyway
    v = _by_id(budget_checks(_priced([200] * 5), 0.5, 1.0, 2.0, 0.2)[0])
    assert v["scenario.refusals_seen"].passed is False


def test_failover_checks() -> None:
    samples = _seq([200] * 10)
    for s in samples[3:7]:
        s.phase = 1
    samples[3].decision = "FAILOVER"
    v = _by_id(failover_checks(samples, 1)[0])
    assert v["scenario.failover_seen"].passed and v["scenario.error_rate_while_down"].passed
    samples[4].status = 502
    v = _by_id(failover_checks(samples, 1)[0])
    assert v["scenario.error_rate_while_down"].passed is False
