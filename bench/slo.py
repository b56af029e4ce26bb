"""SLO verdicts: the seed's NFRs, the project's own tighter targets, and each scenario's checks.
Pure: metrics in, verdicts out; ``failed`` decides the exit status.

Columns: ``seed`` (NFR-001/002 of the requirements seed: P95 <= 3 s, P99 <= 5 s, error rate
< 1 %, router overhead median <= 150 ms and P95 <= 400 ms, rate-limit decision <= 5 ms),
``project`` (design targets: overhead p50 <= 1 ms and p99 <= 5 ms at moderate load) and
``scenario`` (what the scenario is about: limits enforced exactly, failover hid the failure).
A verdict whose metric was not measured in this run is ``None`` (shown as "n/a"), never a pass.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, "==": operator.eq}
OVERHEAD_SOURCES = ("vs direct", "router header")


@dataclass(frozen=True, slots=True)
class Slo:
    id: str
    column: str  # seed | project | scenario
    what: str
    metric: str  # key into the metrics mapping
    op: str
    limit: float
    unit: str
    source: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    slo: Slo
    measured: float | None
    passed: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self.slo), "measured": self.measured, "passed": self.passed,
                "note": self.note}


def _overhead(column: str, pct: str, limit: float, source: str) -> list[Slo]:
    return [Slo(f"{column}.overhead_{pct}.{src.replace(' ', '_')}", column,
                f"router overhead {pct} ({src})", f"overhead_{pct}_ms[{src}]", "<=", limit,
                "ms", source) for src in OVERHEAD_SOURCES]


SEED_SLOS: tuple[Slo, ...] = (
    Slo("seed.latency_p95", "seed", "latency P95", "latency_p95_ms", "<=", 3000, "ms",
        "NFR-001"),
    Slo("seed.latency_p99", "seed", "latency P99", "latency_p99_ms", "<=", 5000, "ms",
        "NFR-001"),
    Slo("seed.error_rate", "seed", "error rate", "error_rate", "<", 0.01, "ratio", "NFR-001"),
    *_overhead("seed", "p50", 150, "NFR-001"),
    *_overhead("seed", "p95", 400, "NFR-001"),
    Slo("seed.ratelimit_decision", "seed", "rate-limit decision (429 answered, P95)",
        "ratelimit_decision_p95_ms", "<=", 5, "ms", "NFR-002"),
)
PROJECT_SLOS: tuple[Slo, ...] = (
    *_overhead("project", "p50", 1, "design targets, moderate load"),
    *_overhead("project", "p99", 5, "design targets, moderate load"),
    Slo("project.added_ttft_p50", "project", "added time to first token p50 (vs direct)",
        "added_ttft_p50_ms", "<=", 0.3, "ms", "design targets"),
)


def check(id_: str, what: str, measured: float | None, op: str, limit: float,
          unit: str = "", note: str = "") -> Verdict:
    """A scenario's own check as a verdict (column ``scenario``)."""
    return evaluate_one(Slo(f"scenario.{id_}", "scenario", what, id_, op, limit, unit),
                        measured, note)


def evaluate_one(slo: Slo, measured: float | None, note: str = "") -> Verdict:
    if measured is None:
        return Verdict(slo, None, None, note or "not measured in this run")
    return Verdict(slo, measured, bool(_OPS[slo.op](measured, slo.limit)), note)


def evaluate(metrics: Mapping[str, float | None], slos: Iterable[Slo] = SEED_SLOS + PROJECT_SLOS,
             notes: Mapping[str, str] | None = None) -> list[Verdict]:
    """One verdict per SLO whose metric this scenario measures (absent keys are skipped:
    a baseline run has no rate-limit decisions to judge)."""
    notes = notes or {}
    return [evaluate_one(s, metrics[s.metric], notes.get(s.metric, ""))
            for s in slos if s.metric in metrics]


def failed(verdicts: Iterable[Verdict], columns: Iterable[str] = ("seed", "scenario")
           ) -> list[Verdict]:
    cols = set(columns)
    return [v for v in verdicts if v.slo.column in cols and v.passed is False]
