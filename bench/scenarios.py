"""The seed's load scenarios (T044): their phases, legs, default sizes and their own checks.

Defaults fit a 2-core machine that also runs the router, the mock and nginx; the seed's own
figures (baseline 100/s, peak 1000/s, burst 2000/s for 30 s) are reachable with --rate and
--duration on a bigger one. ``--smoke`` shrinks every scenario to a few seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.loadgen import WITHHELD, Phase, Sample
from bench.slo import Verdict, check

COMPARISON = ("direct", "nginx", "router")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    about: str
    legs: tuple[str, ...]
    rate: float  # default base arrival rate, requests/s
    duration_s: float  # default total duration
    smoke_rate: float
    smoke_duration_s: float
    expected: tuple[int, ...] = ()  # statuses that are the point (not errors)
    local_only: str = ""  # what it needs that only --local can set up

    def phases(self, rate: float, duration: float, burst_factor: float = 4.0) -> list[Phase]:
        if self.name == "burst":
            third = duration / 3
            return [Phase("before", third, rate),
                    Phase(f"burst x{burst_factor:g}", third, rate * burst_factor),
                    Phase("after", third, rate)]
        if self.name == "backend-failure":
            return [Phase("healthy", duration / 4, rate),
                    Phase("backend b killed", duration / 2, rate),
                    Phase("b restarted", duration / 4, rate)]
        label = {"baseline": "steady", "peak": "sustained peak", "rate-limit": "over the limit",
                 "budget": "spending", "streaming": "streams"}[self.name]
        return [Phase(label, duration, rate)]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("baseline", "steady normal traffic", COMPARISON, 100, 20, 50, 2),
    Scenario("peak", "sustained high rate", COMPARISON, 500, 20, 100, 2),
    Scenario("burst", "a spike to several times the baseline for a bounded time", COMPARISON,
             100, 15, 40, 3),
    Scenario("backend-failure", "one of two backends killed mid-run, then restarted: "
             "failover and the error budget", ("router",), 100, 20, 50, 4,
             local_only="it kills and restarts a backend"),
    Scenario("rate-limit", "a tight per-key limit: 429s exactly where the bucket says, "
             "Retry-After honoured by the client", ("router",), 10, 15, 20, 3, (429,)),
    Scenario("budget", "a small spend budget: 402s once it is spent, never overspent",
             ("router",), 20, 10, 20, 3, (402,),
             local_only="it sets a key's budget and the model's price"),
    Scenario("streaming", "SSE streams: time to first token and per-event latency",
             COMPARISON, 20, 10, 20, 2),
)}


def sent_in_order(samples: Sequence[Sample]) -> list[Sample]:
    return sorted((s for s in samples if s.status != WITHHELD), key=lambda s: s.scheduled + s.lag)


def rate_limit_checks(samples: Sequence[Sample], rpm: int, burst: int,
                      fresh_bucket: bool) -> tuple[list[Verdict], dict[str, float | None]]:
    """429s exactly where a token bucket of ``burst`` tokens refilled at ``rpm``/min puts
    them: never more admitted than the bucket allows, none before it is empty (when the suite
    made the bucket and knows it started full), each carrying Retry-After, and a client that
    waited that long admitted again."""
    sent = sent_in_order(samples)
    ok = [s for s in sent if s.status == 200]
    refused = [s for s in sent if s.status == 429]
    facts: dict[str, float | None] = {"admitted": len(ok), "refused": len(refused)}
    out = [check("refusals_seen", "the limit was reached (429s seen)", float(len(refused)),
                 ">=", 1, "requests")]
    if ok:
        span = max(s.end for s in ok) - (sent[0].scheduled + sent[0].lag)
        bound = burst + rpm * span / 60 + 1
        facts["bucket_bound"] = bound
        out.append(check("admitted_within_bucket", "admitted <= burst + rate x time (+1)",
                         float(len(ok)), "<=", round(bound, 2), "requests",
                         f"burst {burst}, {rpm}/min over {span:.2f} s"))
    if refused and fresh_bucket:
        first = refused[0].scheduled + refused[0].lag
        before = sum(1 for s in ok if s.scheduled + s.lag < first)
        facts["admitted_before_first_429"] = before
        out.append(check("no_early_429", "admitted before the first 429 (the full burst)",
                         float(before), ">=", burst - 1, "requests",
                         "tolerance 1 for a request in flight"))
    if refused:
        with_ra = sum(1 for s in refused if s.retry_after is not None and s.retry_after > 0)
        codes = sum(1 for s in refused if s.error.lower() == "rate_limit_exceeded")
        out.append(check("retry_after_present", "429s carrying Retry-After",
                         with_ra / len(refused), ">=", 1.0, "share"))
        out.append(check("error_code", "429 bodies say rate_limit_exceeded",
                         codes / len(refused), ">=", 1.0, "share"))
    waited = [s for s in sent if s.after_wait]
    out.append(check("retry_after_honoured", "admitted on the first try after waiting "
                     "Retry-After", sum(s.status == 200 for s in waited) / len(waited)
                     if waited else None, ">=", 0.9, "share",
                     f"{len(waited)} retries after a wait" if waited else
                     "no client ever waited"))
    return out, facts


def budget_checks(samples: Sequence[Sample], budget: float, prompt_per_1k: float,
                  completion_per_1k: float, reservation: float, settle_grace_s: float = 0.05
                  ) -> tuple[list[Verdict], dict[str, float | None]]:
    """402s at the right moment: never more spent than the budget; the first 402 only when
    what was spent plus what could still be reserved left less than one request's
    reservation; refusals coded budget_exceeded."""
    sent = sent_in_order(samples)

    def cost(s: Sample) -> float:
        p, c = s.usage or (0, 0)
        return (p * prompt_per_1k + c * completion_per_1k) / 1000

    ok = [s for s in sent if s.status == 200]
    refused = [s for s in sent if s.status == 402]
    spent = sum(cost(s) for s in ok)
    facts: dict[str, float | None] = {"spent": spent, "budget": budget,
                                      "reservation": reservation, "admitted": len(ok),
                                      "refused": len(refused)}
    out = [check("refusals_seen", "the budget was spent (402s seen)", float(len(refused)),
                 ">=", 1, "requests"),
           check("no_overspend", "spent by admitted requests <= budget", round(spent, 6),
                 "<=", budget, "currency"),
           check("usage_reported", "admitted requests whose usage was read",
                 sum(s.usage is not None for s in ok) / len(ok) if ok else None, ">=", 1.0,
                 "share")]
    if refused:
        t = refused[0].scheduled + refused[0].lag
        done_before = sum(cost(s) for s in ok if s.end < t)
        pending = sum(1 for s in ok if s.scheduled + s.lag < t and s.end >= t - settle_grace_s)
        remaining = budget - done_before - pending * reservation
        facts["remaining_at_first_402"] = remaining
        out.append(check("no_early_402", "unreserved budget when first refused < one "
                         "reservation", round(remaining, 6), "<", reservation, "currency",
                         f"{pending} request(s) possibly still reserved"))
        codes = sum(1 for s in refused if s.error.lower() == "budget_exceeded")
        out.append(check("error_code", "402 bodies say budget_exceeded",
                         codes / len(refused), ">=", 1.0, "share"))
    return out, facts


def failover_checks(samples: Sequence[Sample], failure_phase: int
                    ) -> tuple[list[Verdict], dict[str, float | None]]:
    """While backend b was dead, the router failed over (X-Router-Decision FAILOVER) and the
    error rate stayed within the budget (the seed's error-rate SLO judges the whole run)."""
    in_failure = [s for s in samples if s.phase == failure_phase and s.status != WITHHELD]
    failovers = sum(1 for s in in_failure if s.decision == "FAILOVER")
    errors = sum(1 for s in in_failure if not 200 <= s.status < 300)
    facts: dict[str, float | None] = {"failovers_while_down": failovers,
                                      "errors_while_down": errors}
    out = [check("failover_seen", "requests failed over while b was down",
                 float(failovers), ">=", 1, "requests"),
           check("error_rate_while_down", "error rate while b was down",
                 errors / len(in_failure) if in_failure else None, "<", 0.01, "ratio")]
    return out, facts
