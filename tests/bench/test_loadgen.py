"""The open-loop scheduler: arrival times, sends that never wait for answers, latency from the
scheduled time (no coordinated omission), and the figures derived from samples."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.analysis import SUSTAIN_LAG_P99_MS, percentiles_ms, summarize
from bench.client import RetryAfterClient
from bench.loadgen import WITHHELD, Phase, RunStats, Sample, Schedule, clock, open_loop


def test_schedule_spaces_each_phase_at_its_rate() -> None:
    s = Schedule([Phase("a", 2, 10), Phase("burst", 1, 40), Phase("c", 2, 10)])
    assert s.count == 20 + 40 + 20
    assert s.duration == 5
    assert s.offsets[:3] == pytest.approx([0, 0.1, 0.2])
    burst = [o for o, p in zip(s.offsets, s.phase_of, strict=True) if p == 1]
    assert burst[0] == pytest.approx(2.0) and burst[1] - burst[0] == pytest.approx(0.025)
    assert s.rate_at(2.5) == 40 and s.rate_at(4.9) == 10 and s.rate_at(5.0) == 0
    assert s.bounds == [(0, 2), (2, 3), (3, 5)]
    assert s.due_by(0.0) == 1 and s.due_by(0.25) == 3 and s.due_by(99) == s.count


@given(st.lists(st.tuples(st.floats(0.1, 5), st.floats(0.5, 200)), min_size=1, max_size=4))
def test_schedule_offsets_sorted_within_phases(phases: list[tuple[float, float]]) -> None:
    s = Schedule([Phase(str(i), d, r) for i, (d, r) in enumerate(phases)])
    assert s.offsets == sorted(s.offsets)
    for off, p in zip(s.offsets, s.phase_of, strict=True):
        a, b = s.bounds[p]
        assert a <= off < b + 1e-9
    assert s.count == sum(round(d * r) for d, r in phases)


def test_schedule_rejects_empty_and_nonpositive() -> None:
    with pytest.raises(ValueError):
        Schedule([])
    with pytest.raises(ValueError):
        Schedule([Phase("x", 0, 10)])


async def test_open_loop_keeps_sending_while_the_target_stalls() -> None:
    """The target answers nothing for the first 0.3 s. A closed-loop client would send one
    request and wait; the open loop sends every request at its time, and each one's latency
    runs from when it was due, so the stall is charged to all requests queued behind it."""
    stall_until: list[float] = []  # the run's start + 0.3 s, from the first request
    started: list[float] = []

    async def send(s: Sample) -> None:
        now = clock()
        started.append(now)
        if not stall_until:
            stall_until.append(now - s.lag - s.scheduled + 0.3)
        await asyncio.sleep(max(0.0, stall_until[0] - clock()))
        s.status = 200

    schedule = Schedule([Phase("p", 0.5, 40)])
    samples, stats = await open_loop(schedule, send)
    assert stats.sent == len(samples) == schedule.count == 20
    assert [s.index for s in samples] == list(range(20))
    # Sends were not serialised behind the stall: all requests due during it were started.
    due_in_stall = [s for s in samples if s.scheduled < 0.3]
    assert len(due_in_stall) == 12 and all(s.status == 200 for s in samples)
    assert len(started) == 20
    # Latency from the scheduled time covers the rest of the stall (a lower bound that
    # holds however slow the machine is).
    for s in due_in_stall:
        assert s.latency >= 0.3 - s.scheduled - 1e-6
    assert all(s.lag >= 0 for s in samples)


async def test_open_loop_records_failures_as_results() -> None:
    async def send(s: Sample) -> None:
        if s.index % 2:
            raise ConnectionResetError
        s.status = 200

    samples, stats = await open_loop(Schedule([Phase("p", 0.1, 100)]), send)
    assert [s.status for s in samples] == [200, 0] * 5
    assert {s.error for s in samples[1::2]} == {"ConnectionResetError"}
    assert stats.cpu_us_per_request is not None


class _Refuser:
    """A target that refuses the first request with Retry-After and admits the rest."""

    def __init__(self, retry_after: float) -> None:
        self.calls = 0
        self.retry_after = retry_after

    async def send(self, s: Sample) -> None:
        self.calls += 1
        s.status, s.retry_after = (429, self.retry_after) if self.calls == 1 else (200, None)


async def test_retry_after_client_withholds_until_the_wait_is_over() -> None:
    target = _Refuser(0.2)
    client = RetryAfterClient(target)  # type: ignore[arg-type]
    samples, stats = await open_loop(Schedule([Phase("p", 0.5, 20)]), client.send)
    statuses = [s.status for s in samples]
    assert statuses[0] == 429
    withheld = [s for s in samples if s.status == WITHHELD]
    first_after = next(s for s in samples if s.status == 200)
    # Requests due within the 0.2 s wait were not sent - exactly those between the refusal
    # and the first one sent after the wait, which is marked as the retry after a wait and
    # went out no sooner than 0.2 s after the start.
    assert withheld and [s.index for s in withheld] == list(range(1, first_after.index))
    assert first_after.after_wait and first_after.scheduled + first_after.lag >= 0.2
    assert stats.withheld == len(withheld) and stats.sent == target.calls


def _samples(latencies: list[float], lag: float = 0.0, status: int = 200) -> list[Sample]:
    return [Sample(i, i * 0.01, lag=lag, latency=v, status=status)
            for i, v in enumerate(latencies)]


def test_summary_says_when_the_generator_fell_behind() -> None:
    schedule = Schedule([Phase("p", 1, 100)])
    late = _samples([0.01] * 100, lag=(SUSTAIN_LAG_P99_MS + 5) / 1000)
    s = summarize("router", "u", late, RunStats(100, 0, 1, 0.01, [x.lag for x in late]),
                  schedule)
    assert not s["generator"]["sustained"]
    assert "COULD NOT SUSTAIN" in s["generator"]["statement"]
    on_time = _samples([0.01] * 100)
    s = summarize("router", "u", on_time, RunStats(100, 0, 1, 0.01, [0.0] * 100), schedule)
    assert s["generator"]["sustained"] and s["achieved_rate"] == pytest.approx(100, rel=0.02)
    assert s["generator"]["cpu_us_per_request"] == pytest.approx(100)


def test_summary_separates_errors_from_intended_refusals() -> None:
    schedule = Schedule([Phase("p", 1, 10)])
    samples = _samples([0.01] * 6) + [Sample(6, 0.6, latency=0.002, status=429),
                                      Sample(7, 0.7, latency=0.002, status=429),
                                      Sample(8, 0.8, latency=1.0, status=502),
                                      Sample(9, 0.9, status=WITHHELD)]
    s = summarize("router", "u", samples, RunStats(9, 1, 1, 0, [0.0] * 9), schedule,
                  expected=(429,))
    assert s["requests"] == {"scheduled": 10, "sent": 9, "withheld": 1, "ok": 6,
                             "refused": 2, "errors": 1}
    assert s["error_rate"] == pytest.approx(1 / 9)
    assert s["refusal_latency_ms"]["p50"] == pytest.approx(2, rel=0.01)
    assert sum(w["withheld_rps"] for w in s["timeseries"]) == 1


def test_percentiles_come_from_an_hdr_histogram() -> None:
    p = percentiles_ms([i / 1000 for i in range(1, 1001)])  # 1..1000 ms
    assert p is not None
    assert p["p50"] == pytest.approx(500, rel=0.002)
    assert p["p99"] == pytest.approx(990, rel=0.002)
    assert p["max"] == pytest.approx(1000)
    assert percentiles_ms([]) is None


async def test_retry_after_client_in_a_closed_loop_sleeps_instead_of_spinning() -> None:
    from bench.loadgen import closed_loop

    target = _Refuser(0.2)
    client = RetryAfterClient(target, wait=True)  # type: ignore[arg-type]
    samples, stats = await closed_loop(1, 0.3, client.send)
    assert not any(s.status == WITHHELD for s in samples)
    assert samples[0].status == 429 and samples[1].after_wait
    assert samples[1].latency >= 0.2 - 0.01  # it waited the Retry-After before sending


def test_summary_per_phase() -> None:
    schedule = Schedule([Phase("calm", 1, 10), Phase("spike", 1, 20)])
    samples = [Sample(i, off, p, latency=0.01 if p == 0 else 0.05,
                      status=200 if i % 10 else 503)
               for i, (off, p) in enumerate(zip(schedule.offsets, schedule.phase_of,
                                                strict=True))]
    s = summarize("router", "u", samples, RunStats(30, 0, 2, 0, [0.0] * 30), schedule)
    calm, spike = s["phases"]
    assert (calm["name"], calm["target_rate"], calm["sent_rate"]) == ("calm", 10, 10)
    assert (spike["ok"], spike["errors"]) == (18, 2)
    assert calm["p50_ms"] == pytest.approx(10, rel=0.01)
    assert spike["p99_ms"] == pytest.approx(50, rel=0.01)
