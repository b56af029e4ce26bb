"""Health, ejection and failover through the real router and real mock backends."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import post_json
from tests.harness import HOST, MockBackend, Router, http_get, wait_for

USER = [{"role": "user", "content": "x"}]
FAST_HEALTH = {"health_interval_s": 0.2, "health_timeout_s": 0.5, "healthy_threshold": 2,
               "unhealthy_threshold": 2, "outlier_consecutive_failures": 5,
               "outlier_base_ejection_s": 1.0, "outlier_max_ejection_s": 4.0}


def config(backends: dict[str, str], models: dict[str, Any], **server: Any) -> dict[str, Any]:
    return {"server": {**FAST_HEALTH, "auth_required": False, **server},
            "backends": {b: {"url": u} for b, u in backends.items()}, "models": models}


def chat(r: Router, model: str = "m") -> tuple[int, dict[str, str], Any]:
    return post_json(f"{r.url}/v1/chat/completions", {"model": model, "messages": USER})


def health(r: Router) -> dict[str, str]:
    result: dict[str, str] = r.state()["backend_health"]
    return result


def test_backend_killed_under_load_gives_no_client_errors(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a", "--latency-ms", "2"), mock_backend("b", "--latency-ms", "2")
    r = router(config({"a": a.url, "b": b.url},
                      {"m": {"backends": ["a", "b"]}}), workers=2)
    statuses: Counter[int] = Counter()
    backends: Counter[str] = Counter()
    stop_at = time.monotonic() + 4.0
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, r.port, timeout=10)
        body = json.dumps({"model": "m", "messages": USER})
        while time.monotonic() < stop_at:
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                statuses[resp.status] += 1
                backends[resp.getheader("X-Router-Backend") or "?"] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    a.proc.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(20)
    assert statuses[200] > 200
    assert set(statuses) == {200}, f"client-visible errors: {statuses}"
    assert backends["a"] > 0 and backends["b"] > backends["a"]
    wait_for(lambda: health(r).get("a") in ("unhealthy", "ejected"), 5, "a taken out")
    metrics = http_get(f"{r.url}/metrics")[1].decode()
    failovers = [ln for ln in metrics.splitlines()
                 if ln.startswith("router_failover_total{") and 'from_backend="a"' in ln]
    assert failovers and sum(float(ln.rsplit(" ", 1)[1]) for ln in failovers) > 0
    assert 'router_backend_health_status{backend_id="b"} 1.0' in metrics


def test_flapping_backend_is_ejected_then_restored(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    good, flaky = mock_backend("good"), mock_backend("flaky")
    r = router(config({"good": good.url, "flaky": flaky.url},
                      {"m": {"backends": ["good", "flaky"]}}, max_attempts=2), workers=1)
    flaky.configure(error_rate=1.0, error_status=500)
    for _ in range(30):
        status, _, _ = chat(r)
        assert status == 200  # failures fail over to the good backend
    wait_for(lambda: health(r).get("flaky") == "ejected", 5, "ejection")
    served_before = flaky.stats()["requests"]
    for _ in range(20):
        status, headers, _ = chat(r)
        assert status == 200 and headers["X-Router-Backend"] == "good"
        assert headers["X-Router-Decision"] == "WEIGHTED"  # no failed attempt first
    assert flaky.stats()["requests"] == served_before, "an ejected backend gets no traffic"

    flaky.configure(error_rate=0.0)
    wait_for(lambda: "flaky" not in health(r), 5, "restoration")
    seen = {chat(r)[1]["X-Router-Backend"] for _ in range(30)}
    assert seen == {"good", "flaky"}


def test_active_probes_mark_unhealthy_and_recover(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    r = router(config({"a": a.url, "b": b.url}, {"m": {"backends": ["a", "b"]}}), workers=1)
    port = b.port
    b.stop()
    wait_for(lambda: health(r).get("b") == "unhealthy", 5, "probe failure")
    assert {chat(r)[1]["X-Router-Backend"] for _ in range(20)} == {"a"}
    b2 = MockBackend("b", port=port)  # back on the address the config names
    try:
        wait_for(lambda: "b" not in health(r), 5, "recovery")
        assert "b" in {chat(r)[1]["X-Router-Backend"] for _ in range(30)}
    finally:
        b2.stop()
        b2.cleanup()


def test_fallback_model_serves_when_the_model_has_no_backend_left(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    r = router(config({"a": a.url, "b": b.url},
                      {"big": {"backends": ["a"], "fallbacks": ["small"]},
                       "small": {"backends": ["b"]}}), workers=1)
    a.stop()
    status, headers, body = chat(r, "big")
    assert status == 200 and headers["X-Router-Backend"] == "b"
    assert headers["X-Router-Decision"] == "FAILOVER"
    assert body["model"] == "small"  # the fallback backend was asked for its own model
    native = post_json(f"{r.url}/v1/inference", {"model": "big", "prompt": "x"})[2]
    assert native["router"]["backend_id"] == "b"
    assert native["router"]["decision_type"] == "FAILOVER"


def test_a_fallback_model_gets_the_body_as_sent_but_its_model(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    """A failover to a fallback model rewrites the model alone (every other member as sent:
    tests/apirouter/test_validation.py); a body nested too deeply to be rewritten gets one
    clear 400 (accounted), not a failure of ours (orjson, which re-encoded the body before,
    writes 255 levels at most: a 500)."""
    a, b = mock_backend("a"), mock_backend("b")
    r = router(config({"a": a.url, "b": b.url},
                      {"big": {"backends": ["a"], "fallbacks": ["small"]},
                       "small": {"backends": ["b"]}}), workers=1)
    a.stop()
    conn = http.client.HTTPConnection(HOST, r.port, timeout=10)

    def post(body: bytes) -> tuple[int, Any]:
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    huge = b'{"model":"big","messages":[{"role":"user","content":"x"}],"n":1234567890123456789012}'
    status, body = post(huge)
    assert status == 200 and body["model"] == "small"
    deep = (b'{"model":"big","messages":[{"role":"user","content":"x"}],"x":'
            + b"[" * 1020 + b"]" * 1020 + b"}")
    status, body = post(deep)
    assert status == 400 and body["error"]["code"] == "invalid_request"
    assert "fallback model" in body["error"]["message"]
    status, body = post(huge)  # the same connection goes on
    assert status == 200 and body["model"] == "small"
    conn.close()


def test_weights_through_the_real_server_match_the_config(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    r = router(config({"a": a.url, "b": b.url},
                      {"m": {"backends": [{"backend": "a", "weight": 3},
                                          {"backend": "b", "weight": 1}]}}), workers=2)
    n = 2000
    conn = http.client.HTTPConnection(HOST, r.port, timeout=10)
    seen: Counter[str] = Counter()
    body = json.dumps({"model": "m", "messages": USER})
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        seen[resp.getheader("X-Router-Backend") or "?"] += 1
    # Binomial(2000, 0.75): sd ~0.0097; 4 sd keeps this deterministic in practice.
    assert abs(seen["a"] / n - 0.75) < 0.04, seen
