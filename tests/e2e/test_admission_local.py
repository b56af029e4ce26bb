"""The in-process limiter (no Redis) through a real router: one client on one keep-alive
connection gets its whole limit and quota whatever worker serves it; many connections spread
over the workers under load get exactly the limit; after `apirouterctl scale` up and down the
limits still hold exactly; rate-limit headers are consistent and absent where nothing was
decided."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from apirouter.keys import hash_key
from tests.e2e.test_admission_load import CLIENTS, PRICE, USER, Load
from tests.e2e.test_lifecycle import ctl
from tests.harness import HOST, MockBackend, Router, wait_for


def local_config(mock: str) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for name, burst in (("ka", 40), ("spread", 50), ("up", 30), ("down", 30)):
        keys[name] = {"sha256": hash_key(f"ar-{name}"), "org": name, "rpm": 1,
                      "rpm_burst": burst}
    keys["kq"] = {"sha256": hash_key("ar-kq"), "org": "kq", "tier": "admin"}
    return {"server": {"auth_required": True},
            "backends": {"a": {"url": mock}},
            "models": {"m": {"backends": ["a"], "price": PRICE}},
            "keys": keys, "budgets": {"org:kq": {"period": "day", "requests": 30}}}


def keep_alive(r: Router, key: str, n: int) -> tuple[Counter[int], list[dict[str, str]]]:
    """``n`` requests on one keep-alive connection (so one worker serves them all)."""
    conn = http.client.HTTPConnection(HOST, r.port, timeout=30)
    statuses: Counter[int] = Counter()
    headers = []
    body = json.dumps({"model": "m", "messages": USER, "max_tokens": 5})
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer ar-{key}"})
        resp = conn.getresponse()
        resp.read()
        statuses[resp.status] += 1
        headers.append({k: v for k, v in resp.getheaders() if k.startswith("X-RateLimit")})
    conn.close()
    return statuses, headers


def workers(r: Router) -> int:
    return len(json.loads(ctl(r, "--json", "status").stdout)["worker_pids"])


def test_in_process_limits_are_whole_per_instance_across_workers_and_scaling(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router],
        load_beside: None) -> None:
    r = router(local_config(mock_backend("a").url), workers=2)

    statuses, headers = keep_alive(r, "ka", 60)
    assert statuses == {200: 40, 429: 20}, statuses
    first, last_ok, refused = headers[0], headers[39], headers[40]
    assert first == {"X-RateLimit-Limit": "40", "X-RateLimit-Remaining": "39",
                     "X-RateLimit-Reset": first["X-RateLimit-Reset"],
                     "X-RateLimit-Policy": "40;w=60;rate=1"}
    assert last_ok["X-RateLimit-Remaining"] == "0" and refused["X-RateLimit-Limit"] == "40"
    assert all(int(h["X-RateLimit-Remaining"]) <= int(h["X-RateLimit-Limit"])
               for h in headers)
    assert keep_alive(r, "kq", 40)[0] == {200: 30, 402: 10}

    # Refused before admission (bad JSON, unknown key): no rate-limit headers at all.
    conn = http.client.HTTPConnection(HOST, r.port, timeout=10)
    for body, key in (("{not json", "ar-ka"), (json.dumps({"model": "m", "messages": USER}),
                                               "ar-nobody")):
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (400, 401) and not [
            h for h, _ in resp.getheaders() if h.startswith("X-RateLimit")], resp.status
    conn.close()

    load = Load()  # 32 clients, a new connection per request: spread over both workers
    load.run([r], ["spread"], each=2)
    assert load.statuses["spread"] == {200: 50, 429: 2 * CLIENTS - 50}, load.statuses

    assert ctl(r, "scale", "up", "1").returncode == 0
    wait_for(lambda: workers(r) == 3, 30, "three workers")
    load.run([r], ["up"], each=2)
    assert load.statuses["up"] == {200: 30, 429: 2 * CLIENTS - 30}, load.statuses

    for left in (2, 1):  # one at a time: gunicorn may merge two TTOU signals sent at once
        assert ctl(r, "scale", "down", "1").returncode == 0
        wait_for(lambda left=left: workers(r) == left, 30, f"{left} workers")
    assert keep_alive(r, "down", 40)[0] == {200: 30, 429: 10}
