"""Backend health on the control plane: active probes, passive outlier detection, worker liveness.

Active: every ``health_interval_s`` (±10% jitter, so probes of many routers do not align) each
backend with a health path gets a GET with ``health_timeout_s``; 2xx is good.
Passive: every 100 ms the workers' counters in the stats segment are summed into per-backend
deltas and fed to the pure decisions in apirouter.health. A change of any backend's state calls
``on_change`` so the supervisor publishes a new table (every worker sees it on its next request).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence

import aiohttp

from apirouter.health import (
    BackendHealth,
    HealthPolicy,
    after_probe,
    after_traffic,
    eject_outliers,
    state,
)
from apirouter.runstate import pid_alive
from apirouter.stats import SlotView, StatsReader
from apirouter.table import HEALTHY, Backend
from supervisor import metrics
from supervisor.cadence import beat

log = logging.getLogger("apirouter.supervisor")

PASSIVE_TICK_S = 0.1
WORKER_STALE_S = 5.0


class HealthMonitor:
    def __init__(self, stats: StatsReader, on_change: Callable[[], None]) -> None:
        self.stats = stats
        self.on_change = on_change
        self.policy = HealthPolicy()
        self.interval_s = 2.0
        self.timeout_s = 1.0
        self.backends: dict[str, Backend] = {}
        self.health: dict[str, BackendHealth] = {}
        self._published: dict[str, str] = {}
        self._last_totals: dict[tuple[int, int], tuple[Sequence[int], Sequence[int]]] = {}
        self._gauged: dict[str, int] = {}  # router_backend_health_status as last set
        self._slots: list[SlotView] = []  # as the last tick read them
        self._tasks: list[asyncio.Task[None]] = []

    def configure(self, backends: dict[str, Backend], policy: HealthPolicy, interval_s: float,
                  timeout_s: float) -> None:
        self.backends = backends
        self.policy, self.interval_s, self.timeout_s = policy, interval_s, timeout_s
        self.health = {b: self.health.get(b, BackendHealth()) for b in backends}

    @property
    def live_workers(self) -> list[int]:
        """Pids of the workers whose slot (as the last tick read it) has a fresh heartbeat and
        whose process is alive. Worked out when asked (status, state file), not every tick:
        the liveness check reads /proc, ~0.1 ms a worker under load."""
        now = time.time()
        return sorted(s.pid for s in self._slots
                      if now - s.heartbeat < WORKER_STALE_S and pid_alive(s.pid))

    def states(self, now: float | None = None) -> dict[str, str]:
        now = time.time() if now is None else now
        return {b: s for b, h in self.health.items() if (s := state(h, now)) != HEALTHY}

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._probe_loop()),
                       asyncio.ensure_future(self._passive_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _maybe_publish(self) -> None:
        now = time.time()
        current = self.states(now)
        for bid in self.backends:
            # Set when it changes: a multiprocess gauge keeps its value in its file, and
            # setting it every tick cost ~5 µs a backend (~70 cold, idle) for nothing.
            up = 0 if bid in current else 1
            if self._gauged.get(bid) != up:
                metrics.BACKEND_HEALTH.labels(bid).set(up)
                self._gauged[bid] = up
        if current != self._published:
            for bid in set(current) | set(self._published):
                before = self._published.get(bid, HEALTHY)
                after = current.get(bid, HEALTHY)
                if before != after:
                    log.warning("backend %s: %s -> %s", bid, before, after)
                    if after == "ejected":
                        metrics.EJECTIONS.labels(bid).inc()
            self._published = current
            self.on_change()

    # -- active -----------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.gather(*(self._probe(session, b) for b in list(
                    self.backends.values()) if b.health_path))
                self._maybe_publish()
                await asyncio.sleep(self.interval_s * random.uniform(0.9, 1.1))

    async def _probe(self, session: aiohttp.ClientSession, b: Backend) -> None:
        try:
            async with session.get(f"{b.url}{b.health_path}",
                                   timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                ok = 200 <= r.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if b.id in self.health:
            self.health[b.id] = after_probe(self.health[b.id], ok, self.policy)

    # -- passive ----------------------------------------------------------------------------

    async def _passive_loop(self) -> None:
        while True:
            await beat(PASSIVE_TICK_S)  # with the usage drain's poll (supervisor.cadence)
            self.tick(time.time())

    def tick(self, now: float) -> None:
        self._slots = slots = self.stats.read()
        # Only the configured backends' counters are summed (not all STATS_BACKENDS of each
        # slot: ~80 -> ~45 µs a tick with one backend); the totals kept are whole.
        indices = [b.index for b in self.backends.values()]
        ok, failed = dict.fromkeys(indices, 0), dict.fromkeys(indices, 0)
        zeros = (0,) * self.stats.backends
        seen = set()
        for s in slots:
            key = (s.slot, s.pid)
            seen.add(key)
            prev_ok, prev_failed = self._last_totals.get(key, (zeros, zeros))
            successes, failures = s.successes, s.failures
            for i in indices:
                # A re-claimed slot restarts its counters: a drop means "from zero".
                now_ok, was_ok = successes[i], prev_ok[i]
                ok[i] += now_ok - was_ok if now_ok >= was_ok else now_ok
                now_failed, was_failed = failures[i], prev_failed[i]
                failed[i] += now_failed - was_failed if now_failed >= was_failed else now_failed
            self._last_totals[key] = (successes, failures)
        for key in set(self._last_totals) - seen:
            del self._last_totals[key]
        for bid, b in self.backends.items():
            if ok[b.index] or failed[b.index]:
                self.health[bid] = after_traffic(self.health[bid], ok[b.index], failed[b.index])
        self.health = eject_outliers(self.health, now, self.policy)
        self._maybe_publish()
