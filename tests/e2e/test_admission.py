"""Admission against a real redis-server: exactness across workers and instances, token
settlement, and Redis failing under the open and closed policies."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json
from tests.harness import HOST, MockBackend, RedisServer, Router, router_config, wait_for

USER = [{"role": "user", "content": "hello"}]


def keyed_config(mock: str, redis_url: str, key: str, limits: dict[str, int],
                 **server: Any) -> dict[str, Any]:
    return router_config({"a": mock}, {"m": {"a": 1}},
                         keys={key: {"sha256": hash_key(key), "org": "acme", **limits}},
                         redis_url=redis_url, **server)


def hammer(routers: list[Router], key: str, clients: int, each: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    body = json.dumps({"model": "m", "messages": USER, "max_tokens": 5})

    def client(i: int) -> None:
        r = routers[i % len(routers)]
        for _ in range(each):
            conn = http.client.HTTPConnection(HOST, r.port, timeout=10)  # spread over workers
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 429:
                assert int(resp.getheader("Retry-After") or 0) >= 1
                assert resp.getheader("X-RateLimit-Remaining") is not None
            with lock:
                statuses[resp.status] += 1
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def test_exactly_the_burst_across_two_instances_and_four_workers(
        redis_server: RedisServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    cfg = keyed_config(a.url, redis_server.url, "ar-exact", {"rpm": 1, "rpm_burst": 100})
    routers = [router(cfg, workers=2), router(cfg, workers=2)]
    statuses = hammer(routers, "ar-exact", clients=64, each=4)
    assert statuses == {200: 100, 429: 156}, statuses


def test_token_reservations_settle_and_failures_release(
        redis_server: RedisServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    cfg = keyed_config(a.url, redis_server.url, "ar-tpm",
                       {"rpm": 1000, "tpm": 1000, "tpm_burst": 1000})
    r = router(cfg, workers=1)
    auth = {"Authorization": "Bearer ar-tpm"}
    big = {"model": "m", "messages": USER, "max_tokens": 900}
    status, headers, body = post_json(f"{r.url}/v1/chat/completions", big, auth)
    assert status == 200 and headers["X-RateLimit-Limit"] == "1000"
    # ~900 tokens were reserved; the mock used ~12: the refund makes room for another 900.
    wait_for(lambda: post_json(f"{r.url}/v1/chat/completions", big, auth)[0] == 200, 5,
             "settlement")
    status, _, body = post_json(f"{r.url}/v1/chat/completions",
                                {"model": "m", "messages": USER, "max_tokens": 990}, auth)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"


@pytest.fixture
def own_redis() -> Iterator[list[RedisServer]]:
    servers = [RedisServer()]
    yield servers
    servers[-1].stop()
    servers[-1].cleanup()


def test_redis_outage_open_and_closed_policies_then_exact_again(
        own_redis: list[RedisServer], mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    redis = own_redis[0]
    a = mock_backend("a")
    limits = {"rpm": 1, "rpm_burst": 20}
    r_open = router(keyed_config(a.url, redis.url, "ar-out", limits), workers=1)
    r_closed = router(keyed_config(a.url, redis.url, "ar-out", limits,
                                   redis_failure_policy="closed"), workers=1)
    auth = {"Authorization": "Bearer ar-out"}
    url_open = f"{r_open.url}/v1/chat/completions"
    url_closed = f"{r_closed.url}/v1/chat/completions"
    assert post_json(url_open, {"model": "m", "messages": USER}, auth)[0] == 200
    redis.stop()
    slowest = 0.0
    for _ in range(30):
        started = time.monotonic()
        assert post_json(url_open, {"model": "m", "messages": USER}, auth)[0] == 200
        status, _, body = post_json(url_closed, {"model": "m", "messages": USER}, auth)
        assert status == 503 and body["error"]["code"] == "service_unavailable"
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 1.0, "requests must not wait on a dead Redis"
    check = r_open.readyz()["checks"]["admission"]
    assert check["status"] == "degraded" and check["policy"] == "open"

    own_redis.append(redis.restarted())
    wait_for(lambda: post_json(url_closed, {"model": "m", "messages": USER}, auth)[0] == 200,
             10, "Redis back")
    statuses = hammer([r_open, r_closed], "ar-out", clients=8, each=5)
    assert statuses[200] == 20 - 1 and statuses[429] == 40 - 19  # one was spent above
