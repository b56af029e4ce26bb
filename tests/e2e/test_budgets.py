"""Budgets and quotas through real routers and a real Redis: reservations under concurrency,
settlement to actual cost, release on failure, and the admin spend view."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json, request
from tests.harness import MockBackend, RedisServer, Router, wait_for

USER = [{"role": "user", "content": "hello there"}]


def config(mocks: dict[str, str], redis_url: str, budgets: dict[str, Any]) -> dict[str, Any]:
    price = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}  # easy arithmetic
    return {
        "server": {"redis_url": redis_url},
        "backends": {b: {"url": u} for b, u in mocks.items()},
        "models": {"m": {"backends": ["a"], "price": price},
                   "broken": {"backends": ["bad"], "price": price}},
        "keys": {"k1": {"sha256": hash_key("ar-b1"), "org": "acme", "tier": "admin"},
                 "k2": {"sha256": hash_key("ar-b2"), "org": "acme", "tier": "admin"},
                 "ops": {"sha256": hash_key("ar-ops"), "org": "ops", "scopes": ["admin"]}},
        "budgets": budgets,
    }


def test_quota_under_concurrency_never_overspends(
        redis_server: RedisServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a, bad = mock_backend("a"), mock_backend("bad", "--error-rate", "1")
    cfg = config({"a": a.url, "bad": bad.url}, redis_server.url,
                 {"org:acme": {"period": "day", "requests": 30}})
    routers = [router(cfg, workers=2), router(cfg, workers=1)]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        for _ in range(5):
            status, _, body = post_json(f"{routers[i % 2].url}/v1/chat/completions",
                                        {"model": "m", "messages": USER, "max_tokens": 8},
                                        {"Authorization": f"Bearer ar-b{1 + i % 2}"})
            with lock:
                statuses[status] += 1
            if status == 402:
                assert body["error"]["code"] == "quota_exceeded"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == {200: 30, 402: 50}, statuses


def test_spend_settles_to_actual_cost_and_failures_release(
        redis_server: RedisServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a, bad = mock_backend("a"), mock_backend("bad", "--error-rate", "1")
    # max_tokens 1000 at 2.0/1K reserves ~2.0 of a 2.5 budget: one at a time fits.
    cfg = config({"a": a.url, "bad": bad.url}, redis_server.url,
                 {"key:k1": {"period": "month", "spend": 2.5}})
    r = router(cfg, workers=1)
    auth = {"Authorization": "Bearer ar-b1"}
    big = {"model": "m", "messages": USER, "max_tokens": 1000}
    for _ in range(3):  # failures release their reservation (just after answering)
        wait_for(lambda: post_json(f"{r.url}/v1/chat/completions",
                                   {**big, "model": "broken"}, auth)[0] == 502, 5, "release")
    for _ in range(5):  # each settles to a few tokens' worth, so the next one fits again
        wait_for(lambda: post_json(f"{r.url}/v1/chat/completions", big, auth)[0] == 200, 5,
                 "settlement")

    status, _, body = request(f"{r.url}/v1/admin/budgets",
                              headers={"Authorization": "Bearer ar-ops"})
    row = json.loads(body)["budgets"][0]
    assert status == 200 and row["scope"] == "key:k1" and row["spend"]["limit"] == 2.5
    assert 0 < row["spend"]["used"] < 0.5  # five small completions, not five reservations
    assert row["requests"]["used"] == 5  # released failures are not counted

    status, _, body = post_json(f"{r.url}/v1/chat/completions",
                                {**big, "max_tokens": 5000}, auth)
    assert status == 402 and body["error"]["code"] == "budget_exceeded"
