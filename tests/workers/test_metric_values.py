"""workers.metric_values writes what prometheus_client's own multiprocess values would: the same
totals and buckets, read back by the MultiProcessCollector, across a fork. It reaches into the
library's internals, so this fails when a prometheus_client upgrade changes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import json, os, sys
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector
from workers import metrics

assert values.ValueClass._fast, values.ValueClass
m = metrics.RequestMetrics()
samples = [0.0, 0.003, 0.005, 0.0051, 0.7, 1.0, 45.0, 500.0]
rows = [("b1", "primary", True, "m", 200, s, s / 1000) for s in samples]
if os.environ["HOW"] == "one by one":
    for row in rows:
        m.routed(*row)
else:  # as the requests of event-loop turns: together, in turns of 1 to 5
    for turn in ([rows[0]], rows[1:6], rows[6:]):
        m.routed_together(turn)
metrics.ERRORS.labels("RATE_LIMIT_EXCEEDED").inc(2)
pid = os.fork()
if pid == 0:  # a forked worker writes to its own file
    m.routed("b1", "primary", True, "m", 200, 0.02, 0.00002)
    metrics.ERRORS.labels("RATE_LIMIT_EXCEEDED").inc()
    os._exit(0)
os.waitpid(pid, 0)
registry = CollectorRegistry()
MultiProcessCollector(registry)
out = {}
for family in registry.collect():
    for s in family.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value
print(json.dumps(out))
"""


# Many label sets in one turn: backends, decisions, outcomes, models, statuses, latencies.
_MIXED = r"""
import json, os, random
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from workers import metrics

m = metrics.RequestMetrics()
rnd = random.Random(7)
rows = [(rnd.choice(["b1", "b2", "b3"]), rnd.choice(["primary", "fallback", "failover"]),
         rnd.random() < 0.8, rnd.choice(["m", "n"]), rnd.choice([200, 429, 500, 0]),
         rnd.choice([0.0, 0.004, 0.01, 0.3, 2.0, 200.0]), rnd.choice([0.00005, 0.0003, 0.2]))
        for _ in range(400)]
if os.environ["HOW"] == "one by one":
    for row in rows:
        m.routed(*row)
else:
    for i in range(0, len(rows), 37):
        m.routed_together(rows[i:i + 37])
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(json.dumps({s.name + json.dumps(s.labels, sort_keys=True): s.value
                  for family in registry.collect() for s in family.samples}))
"""


def _collect(tmp_path: Path, how: str, script: str = _SCRIPT) -> dict[str, float]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT),
           "HOW": how}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, float] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("how", ["one by one", "together"])
def test_fast_values_total_across_a_fork_and_fill_the_right_buckets(tmp_path: Path,
                                                                    how: str) -> None:
    got = _collect(tmp_path, how)
    lbl = '{"backend_id": "b1", "decision_type": "primary", "success": "true"}'
    assert got["router_requests_total" + lbl] == 9
    assert got['router_requests_by_backend_total{"backend_id": "b1", "model": "m", '
               '"status_code": "200"}'] == 9
    assert got['router_errors_total{"error_code": "RATE_LIMIT_EXCEEDED"}'] == 3

    def bucket(le: str) -> float:
        return got['router_backend_latency_seconds_bucket{"backend_id": "b1", "le": "'
                   + le + '"}']

    # le is inclusive: 0.005 falls in the 0.005 bucket, 0.0051 in the next one.
    assert bucket("0.005") == 3  # 0.0, 0.003, 0.005
    assert bucket("0.01") == 4
    assert bucket("0.025") == 5  # + the forked child's 0.02
    assert bucket("1.0") == 7  # + 0.7, 1.0
    assert bucket("60.0") == 8  # + 45
    assert bucket("+Inf") == 9  # + 500
    assert got['router_backend_latency_seconds_count{"backend_id": "b1"}'] == 9
    assert abs(got['router_backend_latency_seconds_sum{"backend_id": "b1"}']
               - (0.003 + 0.005 + 0.0051 + 0.7 + 1.0 + 45.0 + 500.0 + 0.02)) < 1e-9
    # 0, 3e-6, 5e-6, 5.1e-6 and the child's 2e-5
    assert got['router_overhead_seconds_bucket{"le": "0.0001"}'] == 5
    assert got['router_overhead_seconds_count{}'] == 9


def test_a_turn_of_many_label_sets_counts_as_one_request_at_a_time(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "together").mkdir()
    one = _collect(tmp_path / "one", "one by one", _MIXED)
    together = _collect(tmp_path / "together", "together", _MIXED)
    assert one.keys() == together.keys()
    for name, value in one.items():  # sums: the same additions in another order
        assert together[name] == pytest.approx(value, rel=1e-12), name
    assert sum(v for k, v in one.items() if k.startswith("router_requests_total")) == 400


@given(st.lists(st.one_of(st.floats(min_value=0.0, max_value=200.0),
                          st.sampled_from([0.0, 0.005, 0.01, 0.25, 120.0, 1e9])),
                min_size=1, max_size=40))
def test_many_observer_fills_the_buckets_observe_would(amounts: list[float]) -> None:
    """Bucket by bucket, a list observed at once counts what observing each one would (le
    inclusive: a bound's own value falls in its bucket), whatever the spread."""
    from prometheus_client import CollectorRegistry, Histogram

    from workers.metric_values import many_observer

    registry = CollectorRegistry()
    buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
    one = Histogram("one", "", buckets=buckets, registry=registry)
    together = Histogram("together", "", buckets=buckets, registry=registry)
    for amount in amounts:
        one.observe(amount)
    many_observer(together)(amounts)
    assert [b.get() for b in together._buckets] == [b.get() for b in one._buckets]
    assert together._sum.get() == pytest.approx(one._sum.get(), rel=1e-12)
