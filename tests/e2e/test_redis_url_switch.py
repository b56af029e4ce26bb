"""Review (pre-existing, found while reviewing issue 14's deferred settlement): a reload that
moves admission to another Redis must not fail admissions on the new one.

Requests admitted under the old table settle with the old table's limits
(``Admission.queue_settlement`` -> ``client_for(old limits)``): each one finishing after the
reload switched the worker's Redis client back to the old URL, closing the new client and
failing the admissions waiting on it ("RedisUnavailable: closed"), which opened the breaker:
with the fail-closed policy, 503s for requests while both Redis servers were up.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from apirouter.keys import hash_key
from tests.harness import HOST, MockBackend, RedisServer, Router, wait_for


def config(mock: str, redis: str) -> dict[str, Any]:
    return {"server": {"auth_required": True, "redis_url": redis,
                       "redis_failure_policy": "closed"},
            "backends": {"a": {"url": mock}}, "models": {"m": {"backends": ["a"]}},
            "keys": {"k": {"sha256": hash_key("ar-switch"), "org": "o", "rpm": 100_000,
                           "rpm_burst": 100_000, "tpm": 10_000_000,
                           "tpm_burst": 10_000_000}}}


def post(r: Router, latency_ms: int) -> int:
    conn = http.client.HTTPConnection(HOST, r.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
         "mock": {"latency_ms": latency_ms}}),
        {"Content-Type": "application/json", "Authorization": "Bearer ar-switch"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status


def test_requests_finishing_after_a_redis_url_change_do_not_fail_new_admissions(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    old, new = RedisServer(), RedisServer()
    try:
        mock = mock_backend("a")
        r = router(config(mock.url, old.url), workers=1)
        slow: Counter[int] = Counter()
        admitted_before = [threading.Thread(target=lambda: slow.update([post(r, 1500)]))
                           for _ in range(20)]
        for t in admitted_before:  # admitted on the old Redis, finishing after the reload
            t.start()
            time.sleep(0.02)
        generation = r.state()["generation"]
        r.write_config(config(mock.url, new.url))
        os.kill(r.pid, signal.SIGHUP)
        wait_for(lambda: r.state()["generation"] > generation, 5, "the new table")
        fast: Counter[int] = Counter()
        stop = time.monotonic() + 2.5

        def client() -> None:
            while time.monotonic() < stop:
                fast[post(r, 0)] += 1

        clients = [threading.Thread(target=client) for _ in range(6)]
        for t in clients:
            t.start()
        for t in admitted_before + clients:
            t.join()
        assert slow == {200: 20}
        assert set(fast) == {200}, fast
    finally:
        for s in (old, new):
            s.stop()
            s.cleanup()
