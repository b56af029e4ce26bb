"""A client that hangs up while the router waits on the backend: the backend exchange is
cancelled, the attempt leaves the worker's in-flight count, the reservation is released, and
the request is accounted once as CLIENT_DISCONNECTED (499)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json
from tests.harness import HOST, MockBackend, RedisServer, Router, wait_for

USER = [{"role": "user", "content": "hello there"}]
PRICE = {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}


def _hang_up_after_sending(port: int, doc: dict[str, object], key: str) -> None:
    body = json.dumps(doc).encode()
    s = socket.create_connection((HOST, port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode() +
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s  # type: ignore[return-value]


def _hang_up_three_times(r: Router, backend: MockBackend, slow: dict[str, object],
                         key: str) -> None:
    """Send ``slow`` and hang up once the backend has it, three times over; each time the
    router must close its backend connection."""
    for n in range(1, 4):
        s = _hang_up_after_sending(r.port, slow, key)
        wait_for(lambda n=n: backend.stats()["requests"] >= n, 5, "the backend got the request")
        s.close()
        wait_for(lambda n=n: backend.stats()["aborted_by_peer"] >= n, 2,
                 "the router closed its backend connection")


def _slots_and_reservations_were_released(r: Router, max_tokens: int, key: str) -> None:
    """Each hang-up released its reservation: a request of the same size fits again; and the
    abandoned attempts left backend a's in-flight count: ties still go to a."""
    status, _, _ = post_json(f"{r.url}/v1/chat/completions",
                             {"model": "only-a", "messages": USER, "max_tokens": max_tokens},
                             {"Authorization": f"Bearer {key}"})
    assert status == 200
    for _ in range(5):
        status, headers, _ = post_json(f"{r.url}/v1/chat/completions",
                                       {"model": "m", "messages": USER, "max_tokens": 4},
                                       {"Authorization": f"Bearer {key}"})
        assert status == 200 and headers["X-Router-Backend"] == "a", headers


def _usage_records(run_dir: str) -> list[dict[str, object]]:
    spool = os.path.join(run_dir, "spool")
    out: list[dict[str, object]] = []
    for name in sorted(os.listdir(spool)) if os.path.isdir(spool) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(spool, name)) as f:
                out.extend(json.loads(line) for line in f if line.strip())
    return out


def test_a_client_that_hangs_up_frees_the_backend_slot_and_its_reservation(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    cfg = {
        "backends": {"a": {"url": a.url}, "b": {"url": b.url}},
        "models": {"only-a": {"backends": ["a"], "price": PRICE},
                   # least in-flight first; a tie goes to the first listed backend
                   "m": {"backends": ["a", "b"], "strategy": "least_inflight"}},
        "keys": {"k1": {"sha256": hash_key("ar-d1"), "org": "acme", "tier": "admin"}},
        # max_tokens 1000 at 2.0/1K reserves ~2.0 of 2.5: one such request at a time fits
        "budgets": {"key:k1": {"period": "month", "spend": 2.5}},
    }
    r = router(cfg, workers=1)
    slow = {"model": "only-a", "messages": USER, "max_tokens": 1000,
            "mock": {"latency_ms": 5000}}
    _hang_up_three_times(r, a, slow, "ar-d1")

    # The same mid-stream: the held attempt is released without a verdict on the backend.
    streamed = {"model": "only-a", "messages": USER, "max_tokens": 1000, "stream": True,
                "mock": {"reply_tokens": 50, "event_interval_ms": 200}}
    for n in range(1, 3):
        s = _hang_up_after_sending(r.port, streamed, "ar-d1")
        s.recv(1)  # the head and the first event are out: the stream is under way
        s.close()
        wait_for(lambda n=n: a.stats()["streams_aborted"] >= n, 2,
                 "the router closed the backend stream")

    _slots_and_reservations_were_released(r, 1000, "ar-d1")

    wait_for(lambda: len(_usage_records(r.run_dir)) >= 11, 10, "usage records exported")
    gone = [d for d in _usage_records(r.run_dir) if d["status"] == 499]
    assert len(gone) == 5
    assert {d["error_code"] for d in gone} == {"CLIENT_DISCONNECTED"}
    before_answer = [d for d in gone if not d.get("stream")]
    mid_stream = [d for d in gone if d.get("stream")]
    assert len(before_answer) == 3 and len(mid_stream) == 2
    assert all(d["completion_tokens"] == 0 and d["cost_micro"] == 0 for d in before_answer)
    # A stream settles to what was produced before the hang-up, and says why it ended.
    assert all(d["interruption"] == "client_disconnected" and d["completion_tokens"] < 1000
               for d in mid_stream)


def test_a_hang_up_on_the_callback_path_frees_the_slot_and_its_tokens(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    """The common request — in-process token buckets, no budget, buffered — is forwarded on
    callbacks, without a task to cancel (workers.forwarding.Forwarding): a hang-up must still
    close the backend connection, leave the in-flight count, give back the tokens reserved,
    and be accounted once as CLIENT_DISCONNECTED."""
    a, b = mock_backend("a"), mock_backend("b")
    cfg = {
        "backends": {"a": {"url": a.url}, "b": {"url": b.url}},
        "tiers": {"small": {"rpm": 1000, "tpm": 2500}},
        "models": {"only-a": {"backends": ["a"]},
                   "m": {"backends": ["a", "b"], "strategy": "least_inflight"}},
        "keys": {"k1": {"sha256": hash_key("ar-d2"), "org": "acme", "tier": "small"}},
    }
    r = router(cfg, workers=1)
    # max_tokens 2000 reserves ~2,000 of the 2,500 tokens a minute: one at a time fits
    slow = {"model": "only-a", "messages": USER, "max_tokens": 2000,
            "mock": {"latency_ms": 5000}}
    _hang_up_three_times(r, a, slow, "ar-d2")
    _slots_and_reservations_were_released(r, 2000, "ar-d2")
    wait_for(lambda: len(_usage_records(r.run_dir)) >= 9, 10, "usage records exported")
    gone = [d for d in _usage_records(r.run_dir) if d["status"] == 499]
    assert len(gone) == 3
    assert {d["error_code"] for d in gone} == {"CLIENT_DISCONNECTED"}
    assert all(d["completion_tokens"] == 0 and d["cost_micro"] == 0 for d in gone)


def test_a_hang_up_while_redis_decides_is_accounted_and_released(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router],
        redis_server: RedisServer) -> None:
    """Redis answers late (paused 400 ms, under the 500 ms liveness bound: the decision is
    still Redis's) and the client hangs up meanwhile: the request never reaches the backend,
    is accounted once as CLIENT_DISCONNECTED, and its reservation is released on Redis."""
    a = mock_backend("a")
    cfg = {
        "server": {"redis_url": redis_server.url},
        "backends": {"a": {"url": a.url}},
        "tiers": {"small": {"rpm": 1000, "tpm": 2500}},
        "models": {"m": {"backends": ["a"]}},
        "keys": {"k1": {"sha256": hash_key("ar-d3"), "org": "acme", "tier": "small"}},
    }
    r = router(cfg, workers=1)
    big = {"model": "m", "messages": USER, "max_tokens": 2000}  # one at a time fits
    status, _, _ = post_json(f"{r.url}/v1/chat/completions", big,
                             {"Authorization": "Bearer ar-d3"})  # connected, script loaded
    assert status == 200
    with socket.create_connection((HOST, redis_server.port), timeout=5) as redis:
        redis.sendall(b"*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$3\r\n400\r\n$3\r\nALL\r\n")
        assert redis.recv(64).startswith(b"+OK")
        s = _hang_up_after_sending(r.port, big, "ar-d3")
        time.sleep(0.1)  # the admission is on its way to Redis, which holds it
        s.close()
    wait_for(lambda: any(d["status"] == 499 for d in _usage_records(r.run_dir)), 10,
             "the hang-up's usage record")
    gone = [d for d in _usage_records(r.run_dir) if d["status"] == 499]
    assert len(gone) == 1 and gone[0]["error_code"] == "CLIENT_DISCONNECTED"
    assert gone[0]["completion_tokens"] == 0 and gone[0]["backend_id"] is None
    assert a.stats()["requests"] == 1  # the backend never saw it
    # Its reservation was released: the same request fits again within the minute.
    wait_for(lambda: post_json(f"{r.url}/v1/chat/completions", big,
                               {"Authorization": "Bearer ar-d3"})[0] == 200, 5,
             "the reservation released")
