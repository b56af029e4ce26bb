"""The load generator of the bench suite: open loop at a fixed arrival rate, or closed loop.

Open loop: request i is due at ``schedule.offsets[i]`` seconds after the start, whatever the
target is doing; it is sent as its own task at that moment, and its latency runs from the time
it was DUE, not from when it was sent - so a target that stalls is charged for the queue it
builds (no coordinated omission). ``lag`` (sent minus due) is the generator's own delay and is
reported as its overhead, with the CPU it spent per request. Closed loop: N clients each send
the next request when the previous one is answered - the throughput ceiling, latency from send.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

# Sample.status values that are not HTTP statuses.
TRANSPORT_ERROR = 0  # connection refused/reset, timeout, broken response
WITHHELD = -1  # not sent: the client was honouring a Retry-After


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second (open loop)


class Schedule:
    """Arrival times of an open-loop run: each phase's requests evenly spaced at its rate."""

    def __init__(self, phases: Sequence[Phase]) -> None:
        if not phases:
            raise ValueError("a schedule needs at least one phase")
        self.phases = tuple(phases)
        self.offsets: list[float] = []
        self.phase_of: list[int] = []
        self.bounds: list[tuple[float, float]] = []
        start = 0.0
        for p, phase in enumerate(self.phases):
            if phase.duration_s <= 0 or phase.rate < 0:
                raise ValueError(f"phase {phase.name}: duration > 0 and rate >= 0 required")
            n = round(phase.rate * phase.duration_s)
            self.offsets.extend(start + k / phase.rate for k in range(n))
            self.phase_of.extend([p] * n)
            self.bounds.append((start, start + phase.duration_s))
            start += phase.duration_s
        self.duration = start

    @property
    def count(self) -> int:
        return len(self.offsets)

    def rate_at(self, t: float) -> float:
        for phase, (a, b) in zip(self.phases, self.bounds, strict=True):
            if a <= t < b:
                return phase.rate
        return 0.0

    def due_by(self, elapsed: float) -> int:
        """How many requests are due at ``elapsed`` seconds (offsets are sorted)."""
        import bisect

        return bisect.bisect_right(self.offsets, elapsed)


@dataclass(slots=True)
class Sample:
    """One request: times in seconds relative to the run's start."""

    index: int
    scheduled: float
    phase: int = 0
    lag: float = 0.0  # sent - due: the generator's own delay
    latency: float = 0.0  # answered in full (or failed) - due (open loop) / - sent (closed)
    status: int = TRANSPORT_ERROR
    error: str = ""  # transport error kind, or the error code of an HTTP error body
    router_ms: float | None = None  # X-Router-Latency-Ms
    backend_ms: float | None = None  # the router block's backend_latency_ms (/v1/inference)
    decision: str = ""  # X-Router-Decision
    retry_after: float | None = None
    ttft: float | None = None  # first SSE event - due
    event_gaps: list[float] = field(default_factory=list)  # between SSE events
    usage: tuple[int, int] | None = None  # prompt, completion tokens of a 200
    after_wait: bool = False  # the first request sent after honouring a Retry-After

    @property
    def end(self) -> float:
        return self.scheduled + self.latency


Send = Callable[[Sample], Awaitable[None]]


@dataclass(slots=True)
class RunStats:
    """What the generator itself did: how many it sent, how late, at what CPU cost."""

    sent: int
    withheld: int
    wall_s: float
    cpu_s: float
    lags: list[float]

    @property
    def cpu_us_per_request(self) -> float | None:
        return self.cpu_s / self.sent * 1e6 if self.sent else None


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# All times come from perf_counter: uvloop's loop.time() has millisecond resolution.
clock = time.perf_counter


async def _one(send: Send, s: Sample, due: float, done: Callable[[Sample], None]) -> None:
    s.lag = clock() - due
    try:
        await send(s)
    except TimeoutError:
        s.status, s.error = TRANSPORT_ERROR, "timeout"
    except Exception as e:  # noqa: BLE001 - every failure is a result, not a crash
        s.status, s.error = TRANSPORT_ERROR, type(e).__name__
    s.latency = clock() - due
    done(s)


async def open_loop(schedule: Schedule, send: Send,
                    done: Callable[[Sample], None] = lambda s: None,
                    start_delay: float = 0.05) -> tuple[list[Sample], RunStats]:
    """Send ``schedule`` at its arrival times; every request runs as its own task, so a slow
    answer never delays the next send. Returns the samples in schedule order."""
    loop = asyncio.get_running_loop()
    samples = [Sample(i, off, schedule.phase_of[i]) for i, off in enumerate(schedule.offsets)]
    tasks: set[asyncio.Task[None]] = set()
    cpu0 = _cpu()
    t0 = clock() + start_delay
    for s in samples:
        due = t0 + s.scheduled
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(_one(send, s, due, done))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    stats = RunStats(sum(s.status != WITHHELD for s in samples),
                     sum(s.status == WITHHELD for s in samples), clock() - t0,
                     _cpu() - cpu0, [s.lag for s in samples if s.status != WITHHELD])
    return samples, stats


async def closed_loop(concurrency: int, duration_s: float, send: Send,
                      done: Callable[[Sample], None] = lambda s: None
                      ) -> tuple[list[Sample], RunStats]:
    """``concurrency`` clients, each sending its next request when the last is answered,
    until ``duration_s`` has passed. Latency here runs from the actual send."""
    samples: list[Sample] = []
    cpu0 = _cpu()
    t0 = clock()
    end = t0 + duration_s

    async def client() -> None:
        while (now := clock()) < end:
            s = Sample(len(samples), now - t0)
            samples.append(s)
            await _one(send, s, now, done)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    stats = RunStats(len(samples), 0, clock() - t0, _cpu() - cpu0, [0.0] * len(samples))
    return samples, stats
