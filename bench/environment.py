"""What a scenario runs against. ``LocalEnv`` starts the mock backends, the router (with the
keys, limits, budget and price the scenarios need), redis-server when admission must be exact,
and nginx as the comparison hop, all on loopback; ``TargetEnv`` points at a running router."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from dataclasses import dataclass, field
from typing import Any

from bench.procs import ManagedProcess, MockBackend, Nginx, RedisServer, Router

MODEL = "bench-model"
BENCH_KEY = "ar-bench-suite-key"  # unlimited (admin tier, huge rpm)
LIMITED_KEY = "ar-bench-suite-limited"
BUDGET_KEY = "ar-bench-suite-budget"
PRICE = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}


@dataclass
class Urls:
    router: str | None = None
    direct: str | None = None
    nginx: str | None = None
    cpu_pids: dict[str, int] = field(default_factory=dict)  # leg -> pid of its process tree


class TargetEnv:
    """An already running router (and optionally the backend behind it, for comparison)."""

    local = False

    def __init__(self, target: str, direct: str | None) -> None:
        self.urls = Urls(router=target.rstrip("/"), direct=direct.rstrip("/") if direct else None)
        self.description: dict[str, Any] = {"kind": "target", "router": self.urls.router,
                                            "direct": self.urls.direct}

    def close(self) -> None:
        pass


class LocalEnv:
    """Everything on loopback, stopped by ``close``."""

    local = True

    def __init__(self, *, workers: int, backend_latency_ms: float, two_backends: bool,
                 redis: bool, nginx: bool, rpm: int, rpm_burst: int, budget: float,
                 stream_behaviour: dict[str, Any] | None = None) -> None:
        self.procs: list[ManagedProcess] = []
        self.behaviour: dict[str, Any] = {"latency_ms": backend_latency_ms}
        try:
            self.mocks = [self._start(MockBackend(name, "--models", MODEL, "--latency-ms",
                                                  str(backend_latency_ms)))
                          for name in (("a", "b") if two_backends else ("a",))]
            if stream_behaviour:
                self.behaviour.update(self.configure_streams(stream_behaviour))
            self.redis = self._start(RedisServer()) if redis else None
            self.router = self._start(Router(
                self.router_config(rpm, rpm_burst, budget), workers=workers))
            self.nginx = self._start(Nginx(f"127.0.0.1:{self.mocks[0].port}",
                                           workers=workers)) if nginx else None
        except BaseException:
            self.close()
            raise
        self.urls = Urls(router=self.router.url, direct=self.mocks[0].url,
                         nginx=self.nginx.url if self.nginx else None,
                         cpu_pids={"direct": self.mocks[0].pid, "router": self.router.pid,
                                   **({"nginx": self.nginx.pid} if self.nginx else {})})
        self.description = {
            "kind": "local", "router_workers": workers,
            "backends": {m.backend_name: m.url for m in self.mocks},
            "backend_behaviour": self.behaviour,
            "admission": "redis" if self.redis else "in-process",
            "nginx": {"workers": workers, "upstream_keepalive": 64} if self.nginx else None,
            "rate_limit": {"rpm": rpm, "rpm_burst": rpm_burst},
            "budget": {"spend": budget, "price": PRICE}}

    def _start(self, proc: Any) -> Any:
        self.procs.append(proc)
        return proc

    def configure_streams(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """Pace the mock's SSE streams (time to first event, gap between events, events per
        stream) where the mock supports it; returns what it accepted."""
        accepted: dict[str, Any] = {}
        for k, v in wanted.items():
            try:
                for m in self.mocks:
                    m.configure(**{k: v})
                accepted[k] = v
            except Exception:  # noqa: BLE001 - an older mock without stream pacing
                accepted[k] = f"unsupported by this mock ({v} not set)"
        return accepted

    def router_config(self, rpm: int, rpm_burst: int, budget: float) -> dict[str, Any]:
        def key(secret: str, **extra: Any) -> dict[str, Any]:
            return {"sha256": hashlib.sha256(secret.encode()).hexdigest(), "org": "bench",
                    "tier": "admin", "scopes": ["inference"], **extra}

        return {
            "server": {"auth_required": True, "redis_url": self.redis.url if self.redis else ""},
            "backends": {m.backend_name: {"url": m.url} for m in self.mocks},
            "models": {MODEL: {"backends": [{"backend": m.backend_name, "weight": 1}
                                            for m in self.mocks], "price": PRICE}},
            "keys": {"bench": key(BENCH_KEY, rpm=10**9, tpm=10**12),
                     "limited": key(LIMITED_KEY, rpm=rpm, rpm_burst=max(rpm, rpm_burst),
                                    tpm=10**12),
                     "budgeted": key(BUDGET_KEY, rpm=10**9, tpm=10**12)},
            "budgets": {"key:budgeted": {"period": "day", "spend": budget}},
        }

    def kill_backend(self, index: int) -> None:
        self.mocks[index].stop(timeout=5, sig=signal.SIGKILL)

    def restart_backend(self, index: int) -> None:
        old = self.mocks[index]
        old.cleanup()
        new = MockBackend(old.backend_name, "--models", MODEL, "--latency-ms",
                          str(self.behaviour["latency_ms"]), port=old.port)
        self.procs[self.procs.index(old)] = new
        self.mocks[index] = new

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(timeout=10)
            finally:
                p.cleanup()


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)


def redis_available() -> bool:
    return shutil.which("redis-server") is not None
