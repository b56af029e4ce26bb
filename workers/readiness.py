"""What readyz reports: the worker's own view, the supervisor's published checks, and whether a
supervisor is there at all.

A worker whose supervisor died goes on serving (the pool is orphaned until a new supervisor
adopts it), but nobody drains the usage rings and nobody publishes tables: readyz says so
(``supervisor: gone``, ``usage_sink: no supervisor``, overall ``degraded``) instead of
repeating the last checks the dead supervisor published. The worker learns it from the run
directory's lock (apirouter.runstate.supervisor_alive), probed on each heartbeat — a lock, not
a pid, so it holds across PID namespaces.

Dependencies are probed actively, never inferred from the absence of errors: the worker PINGs
the admission Redis on its own connection every REDIS_PROBE_S (bounded by REDIS_PROBE_TIMEOUT_S)
and readyz reports the cached answer; the supervisor probes Kafka (a metadata request when
idle) and etcd (each second) and publishes their state in the routing table. readyz itself
never does I/O.
"""

from __future__ import annotations

import asyncio
import platform
import time
from typing import Any

from apirouter.buildinfo import build_info
from apirouter.redis_client import RedisClient
from apirouter.runstate import supervisor_alive

REDIS_PROBE_S = 1.5
REDIS_PROBE_TIMEOUT_S = 0.5


class SupervisorWatch:
    """Whether a supervisor holds the run directory, as of the last heartbeat."""

    def __init__(self) -> None:
        self.run_dir: str | None = None
        self.alive = True
        self.gone_since: float | None = None

    def check(self, run_dir: str) -> bool:
        self.run_dir = run_dir
        alive = supervisor_alive(run_dir)
        if alive:
            self.gone_since = None
        elif self.gone_since is None:
            self.gone_since = time.time()
        self.alive = alive
        return alive


WATCH = SupervisorWatch()


class RedisProbe:
    """PING the admission Redis on a connection of its own (a timed-out probe must not
    disturb admission calls); the last answer is what readyz reports."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._client: RedisClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.result: dict[str, Any] | None = None
        self._at = 0.0

    def kick(self, url: str | None) -> None:
        """Start a probe if one is due (called from the worker's heartbeat)."""
        if url != self.url:
            if self._client is not None:
                self._client.close()
            self.url, self._client, self.result = url, None, None
        if not url or (self._task is not None and not self._task.done()):
            return
        if time.monotonic() - self._at >= REDIS_PROBE_S:
            self._at = time.monotonic()
            self._task = asyncio.ensure_future(self._probe(url))

    async def _probe(self, url: str) -> None:
        if self._client is None:
            self._client = RedisClient(url)
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(
                self._client.execute("PING", timeout=REDIS_PROBE_TIMEOUT_S),
                REDIS_PROBE_TIMEOUT_S + 0.1)
            ok = reply in (b"PONG", "PONG")
            error = None if ok else repr(reply)[:200]
        except Exception as e:  # refused, reset, timed out: all say "not answering"
            ok, error = False, f"{type(e).__name__}: {e}"[:200]
            self._client.close()
            self._client = None
        if url == self.url:
            self.result = {"ok": ok, "at": time.time(), "error": error,
                           "latency_ms": round((time.monotonic() - started) * 1000, 2)}

    def merge(self, admission: dict[str, Any]) -> dict[str, Any]:
        """The admission check with the probe's answer (degraded when Redis does not)."""
        if admission.get("backend") != "redis" or self.result is None:
            return admission
        merged = {**admission, "probe": self.result}
        if not self.result["ok"]:
            merged["status"] = "degraded"
        return merged


REDIS = RedisProbe()


def report(pid: int, generation: int, table: Any, load_errors: int,
           admission: dict[str, object]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, readyz body). 503 only when there is nothing to route to: a degraded
    router still serves, and load balancers must not pull every instance at once."""
    registry_ok = bool(table.backends) and bool(table.routes)
    checks: dict[str, Any] = {
        "routing_table": {
            "status": "ok",
            "generation": generation,
            "source": table.source,
            "compiled_at": table.compiled_at,
            "age_s": round(time.time() - table.compiled_at, 3),
            "load_errors": load_errors,
        },
        "backend_registry": {
            "status": "ok" if registry_ok else "empty",
            "backends": len(table.backends),
            "models": len(table.routes),
        },
        "admission": REDIS.merge(admission),
        **{name: check for name, check in table.status.items()},
    }
    if not WATCH.alive:
        checks["supervisor"] = {
            "status": "gone", "since": WATCH.gone_since,
            "detail": "no supervisor holds the run directory: this pool serves on its last "
                      "table, usage records wait in the rings and overflow files until a "
                      "supervisor started on the same run directory takes them over"}
        checks["usage_sink"] = {"status": "no supervisor"}
    else:
        checks["supervisor"] = {"status": "ok"}
    # Each check says how it is; the summary is "ready" while this pool can route and a
    # supervisor stands behind it (a dependency's outage alone leaves it serving: "ready").
    healthy = registry_ok and WATCH.alive
    doc = {
        "status": "ready" if healthy else "degraded",
        "worker_pid": pid,
        "checks": checks,
        "build": {**build_info(), "python": platform.python_version()},
    }
    return (200 if registry_ok else 503), doc
