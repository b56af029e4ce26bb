"""From one leg's samples to its figures: HDR-histogram percentiles, rates, the generator's
own overhead and whether it kept up, and one-second time series for the plots. Pure."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.loadgen import WITHHELD, RunStats, Sample, Schedule

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
# The generator "kept up" when it sent at least this share of the target rate and its own
# send delay (lag) stayed under this at p99; otherwise the report says it could not.
SUSTAIN_RATE_SHARE = 0.95
SUSTAIN_LAG_P99_MS = 10.0
_HIGHEST_US = 3_600_000_000  # one hour


def histogram(values_s: Iterable[float]) -> HdrHistogram:
    """An HDR histogram of durations in microseconds (3 significant digits)."""
    h = HdrHistogram(1, _HIGHEST_US, 3)
    for v in values_s:
        h.record_value(min(max(1, round(v * 1e6)), _HIGHEST_US))
    return h


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float] | None:
    """p50 ... p99.9, min, max and mean in milliseconds, or None without values."""
    if not values_s:
        return None
    h = histogram(values_s)
    out = {_pname(p): h.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out.update(min=min(values_s) * 1000, max=max(values_s) * 1000,
               mean=sum(values_s) / len(values_s) * 1000)
    return out


def _pname(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", ""))


def histogram_buckets(values_s: Sequence[float], bins: int = 50) -> list[list[float]]:
    """[low ms, high ms, count] over ``bins`` log-spaced bins between the fastest and the
    slowest request, filled from the HDR histogram's recorded values (for the plot)."""
    if not values_s:
        return []
    h = histogram(values_s)
    recorded = [(item.value_iterated_to / 1000, item.count_added_in_this_iter_step)
                for item in h.get_recorded_iterator()]
    lo, hi = recorded[0][0], recorded[-1][0]
    if hi <= lo * 1.0001:
        return [[lo, hi, float(sum(c for _, c in recorded))]]
    ratio = (hi / lo) ** (1 / bins)
    edges = [lo * ratio ** i for i in range(bins + 1)]
    counts = [0] * bins
    for v, c in recorded:
        i = min(bins - 1, int(math.log(v / lo) / math.log(ratio)))
        counts[i] += c
    return [[edges[i], edges[i + 1], float(counts[i])] for i in range(bins)]


def summarize(name: str, url: str, samples: Sequence[Sample], stats: RunStats,
              schedule: Schedule | None, *, expected: Sequence[int] = (),
              backend_service_ms: float | None = None, window_s: float = 1.0
              ) -> dict[str, Any]:
    """Every figure of one leg. ``expected``: statuses that are the point of the scenario
    (429, 402) - counted as refusals, not errors. ``backend_service_ms``: the backend's own
    time when the router does not report it, so X-Router-Latency-Ms minus it bounds the
    router's overhead from above."""
    sent = [s for s in samples if s.status != WITHHELD]
    ok = [s for s in sent if 200 <= s.status < 300]
    refused = [s for s in sent if s.status in expected]
    errors = [s for s in sent if not 200 <= s.status < 300 and s.status not in expected]
    starts = [s.scheduled + s.lag for s in sent]
    span = (max(starts) - min(starts)) if len(starts) > 1 else 0.0
    achieved = (len(starts) - 1) / span if span > 0 else None
    duration = schedule.duration if schedule else stats.wall_s
    target = schedule.count / schedule.duration if schedule else None
    ends = [s.end for s in ok]
    throughput = len(ok) / (max(ends) - min(starts)) if ok and max(ends) > min(starts) else 0.0
    lag = percentiles_ms(stats.lags)
    generator: dict[str, Any] = {
        "cpu_us_per_request": stats.cpu_us_per_request,
        "lag_ms": lag, "sent": stats.sent, "withheld": stats.withheld,
        "wall_s": stats.wall_s}
    if schedule is not None:
        # Withheld requests were held back on purpose (Retry-After): the rate to judge the
        # generator by is what it was asked to send.
        asked = (schedule.count - stats.withheld) / schedule.duration
        rate_ok = achieved is None and len(starts) <= 1 or (
            achieved is not None and achieved >= SUSTAIN_RATE_SHARE * asked)
        lag_ok = lag is None or lag["p99"] <= SUSTAIN_LAG_P99_MS
        generator["sustained"] = bool(rate_ok and lag_ok)
        generator["statement"] = sustain_statement(name, asked, achieved, lag, rate_ok, lag_ok)
    else:
        generator["sustained"] = True
        generator["statement"] = f"{name}: closed loop, {len(sent)} requests"
    router_ms = [s.router_ms / 1000 for s in ok if s.router_ms is not None]
    overhead = [(s.router_ms - s.backend_ms) / 1000 for s in ok
                if s.router_ms is not None and s.backend_ms is not None]
    overhead_source = "router block (total - backend)"
    if not overhead and router_ms and backend_service_ms is not None:
        overhead = [max(0.0, v - backend_service_ms / 1000) for v in router_ms]
        overhead_source = ("X-Router-Latency-Ms minus the backend's configured time to what it "
                           "times (the answer; for a stream, the first event)")
    ttft = [s.ttft for s in ok if s.ttft is not None]
    gaps = [g for s in ok for g in s.event_gaps]
    return {
        "name": name, "url": url,
        "requests": {"scheduled": len(samples), "sent": len(sent),
                     "withheld": len(samples) - len(sent), "ok": len(ok),
                     "refused": len(refused), "errors": len(errors)},
        "error_rate": len(errors) / len(sent) if sent else 0.0,
        "status_counts": {str(k): v for k, v in sorted(Counter(s.status for s in sent).items())},
        "error_kinds": dict(Counter(s.error or str(s.status) for s in errors).most_common(10)),
        "decisions": dict(Counter(s.decision for s in ok if s.decision)),
        "duration_s": duration, "target_rate": target, "achieved_rate": achieved,
        "throughput_ok_rps": throughput,
        "latency_ms": percentiles_ms([s.latency for s in ok]),
        "refusal_latency_ms": percentiles_ms([s.latency for s in refused]),
        "router_latency_ms": percentiles_ms(router_ms),
        "overhead_header_ms": percentiles_ms(overhead),
        "overhead_header_source": overhead_source if overhead else None,
        "ttft_ms": percentiles_ms(ttft),
        "event_gap_ms": percentiles_ms(gaps),
        "events_per_stream": (len(gaps) + len(ttft)) / len(ttft) if ttft else None,
        "generator": generator,
        "phases": per_phase(samples, schedule, expected) if schedule else [],
        "timeseries": timeseries(samples, schedule, expected, window_s, duration),
        "histogram_ms": histogram_buckets([s.latency for s in ok]),
    }


def per_phase(samples: Sequence[Sample], schedule: Schedule, expected: Sequence[int]
              ) -> list[dict[str, Any]]:
    """The same counts and percentiles for each phase of the scenario (by scheduled time)."""
    out = []
    for i, (phase, (a, b)) in enumerate(zip(schedule.phases, schedule.bounds, strict=True)):
        sent = [s for s in samples if s.phase == i and s.status != WITHHELD]
        ok = [s.latency for s in sent if 200 <= s.status < 300]
        errors = sum(1 for s in sent if not 200 <= s.status < 300 and s.status not in expected)
        lat = percentiles_ms(ok)
        out.append({"name": phase.name, "start_s": a, "end_s": b, "target_rate": phase.rate,
                    "sent_rate": len(sent) / (b - a), "ok": len(ok), "errors": errors,
                    "error_rate": errors / len(sent) if sent else 0.0,
                    "p50_ms": lat["p50"] if lat else None, "p99_ms": lat["p99"] if lat else None})
    return out


def sustain_statement(name: str, asked: float, achieved: float | None,
                      lag: dict[str, float] | None, rate_ok: bool, lag_ok: bool) -> str:
    got = f"{achieved:.1f}/s" if achieved is not None else "n/a"
    if rate_ok and lag_ok:
        return f"{name}: generator sustained the target rate ({got} of {asked:.1f}/s)"
    why = []
    if not rate_ok:
        why.append(f"sent {got} of the target {asked:.1f}/s")
    if not lag_ok and lag is not None:
        why.append(f"its own send delay reached {lag['p99']:.1f} ms at p99 "
                   f"(limit {SUSTAIN_LAG_P99_MS:g} ms)")
    return (f"{name}: THE GENERATOR COULD NOT SUSTAIN THE TARGET RATE: {'; '.join(why)} - "
            "latencies include its delay; lower --rate or free the machine")


def timeseries(samples: Sequence[Sample], schedule: Schedule | None, expected: Sequence[int],
               window_s: float, duration: float) -> list[dict[str, Any]]:
    """Per window: the target rate, requests answered OK / refused / failed in it (by end
    time), withheld by the client, and latency percentiles of the OK requests due in it (by
    scheduled time)."""
    n = max(1, int(duration / window_s + 0.999))
    lat: list[list[float]] = [[] for _ in range(n)]
    ok, refused, failed, withheld = [0] * n, [0] * n, [0] * n, [0] * n
    for s in samples:
        if s.status == WITHHELD:
            withheld[min(n - 1, int(s.scheduled / window_s))] += 1
            continue
        due_w = min(n - 1, int(s.scheduled / window_s))
        end_w = min(n - 1, int(s.end / window_s))
        if 200 <= s.status < 300:
            ok[end_w] += 1
            lat[due_w].append(s.latency)
        elif s.status in expected:
            refused[end_w] += 1
        else:
            failed[end_w] += 1
    out = []
    for w in range(n):
        p = percentiles_ms(lat[w])
        out.append({"t": w * window_s,
                    "target_rate": schedule.rate_at(w * window_s) if schedule else None,
                    "ok_rps": ok[w] / window_s, "refused_rps": refused[w] / window_s,
                    "error_rps": failed[w] / window_s, "withheld_rps": withheld[w] / window_s,
                    "p50_ms": p["p50"] if p else None, "p95_ms": p["p95"] if p else None,
                    "p99_ms": p["p99"] if p else None})
    return out

