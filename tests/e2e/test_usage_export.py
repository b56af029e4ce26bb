"""Usage export end to end: real router processes, a real Kafka-protocol broker (tansu) and
redis-server. Every request id a client got back must arrive on the topic — across a worker
killed with SIGKILL, a 30-second broker outage under load, and a supervisor restart with a
non-empty spool; duplicates, if any, must be byte-identical."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import jsonschema
import psutil
from aiokafka import AIOKafkaConsumer

from apirouter.keys import hash_key
from apirouter.usage import schema
from tests.harness import (
    HOST,
    ROOT,
    KafkaBroker,
    MockBackend,
    RedisServer,
    Router,
    free_port,
    wait_for,
)

USER = [{"role": "user", "content": "hello"}]
UNLIMITED = {"rpm": 10_000_000, "rpm_burst": 10_000_000, "tpm": 10**10, "tpm_burst": 10**10}
CHAT = json.dumps({"model": "m", "messages": USER, "max_tokens": 5})


def kafka_config(mock: str, bootstrap: str, topic: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"auth_required": True, "kafka_bootstrap": bootstrap, "kafka_topic": topic,
                   # tansu has no InitProducerId: aiokafka's idempotent producer fails on it.
                   "kafka_idempotence": False, "kafka_timeout_s": 1.0, **server},
        "backends": {"a": {"url": mock}},
        "models": {"m": {"backends": ["a"], "price": {"prompt_per_1k": 1.0,
                                                      "completion_per_1k": 2.0}}},
        "keys": {
            "k-acme": {"sha256": hash_key("sk-acme"), "org": "acme",
                       "scopes": ["inference", "audit"], **UNLIMITED},
            "k-globex": {"sha256": hash_key("sk-globex"), "org": "globex",
                         "scopes": ["inference", "audit"]},
            "k-tight": {"sha256": hash_key("sk-tight"), "org": "acme", "scopes": ["inference"],
                        "rpm": 1, "rpm_burst": 1},
            "k-admin": {"sha256": hash_key("sk-admin"), "org": "ops", "scopes": ["admin"]},
        },
    }


def send(router: Router, key: str = "sk-acme", path: str = "/v1/chat/completions",
         body: str = CHAT, conn: http.client.HTTPConnection | None = None
         ) -> tuple[int, str, bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection(HOST, router.port, timeout=10)
    c.request("POST", path, body, {"Content-Type": "application/json",
                                   "Authorization": f"Bearer {key}"})
    resp = c.getresponse()
    data = resp.read()
    if own:
        c.close()
    return resp.status, resp.getheader("X-Request-ID") or "", data


def consume(bootstrap: str, topic: str, want: set[str], timeout: float
            ) -> dict[str, list[tuple[bytes | None, bytes]]]:
    """Records on ``topic`` by request id (key, value), until every id in ``want`` is seen."""

    async def run() -> dict[str, list[tuple[bytes | None, bytes]]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    metadata_max_age_ms=500, request_timeout_ms=5000)
        await consumer.start()
        seen: dict[str, list[tuple[bytes | None, bytes]]] = {}
        deadline = time.monotonic() + timeout
        try:
            while not want <= seen.keys() and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                for messages in batches.values():
                    for m in messages:
                        rid = json.loads(m.value)["request_id"]
                        seen.setdefault(rid, []).append((m.key, m.value))
        finally:
            await consumer.stop()
        return seen

    return asyncio.run(run())


def assert_delivered(seen: dict[str, list[tuple[bytes | None, bytes]]], want: set[str]) -> None:
    missing = want - seen.keys()
    assert not missing, f"{len(missing)} of {len(want)} records never arrived, e.g. " \
                        f"{sorted(missing)[:3]}"
    for rid in want:
        copies = seen[rid]
        assert all(c == copies[0] for c in copies), f"duplicates of {rid} differ"


def denied_request(router: Router) -> tuple[set[str], str]:
    """Requests with the 1-per-minute key until one is refused (in-process limiting gives
    each worker its own share): (the ids admitted, the id refused)."""
    admitted = set()
    for _ in range(10):
        status, rid, _ = send(router, "sk-tight")
        if status == 429:
            return admitted, rid
        admitted.add(rid)
    raise AssertionError("the 1-per-minute key was never refused")


def metric(router: Router, name: str) -> float:
    with urllib.request.urlopen(f"{router.url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def worker_pids(router: Router) -> list[int]:
    return [p.pid for p in psutil.Process(router.state()["gunicorn_pid"]).children()]


def kafka_router(broker: KafkaBroker, mock_backend: Callable[..., MockBackend],
                 router: Callable[..., Router], tag: str, **server: Any) -> tuple[Router, str]:
    """A 2-worker router exporting to a fresh topic of ``broker``, once it is connected."""
    topic = f"usage-{tag}-{free_port()}"
    r = router(kafka_config(mock_backend("a").url, broker.bootstrap, topic, **server),
               workers=2)
    wait_for(lambda: r.readyz()["checks"]["usage_sink"]["connected"], 10, "kafka connected")
    return r, topic


def test_n_requests_make_n_records_with_the_expected_content(
        kafka_broker: KafkaBroker, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    r, topic = kafka_router(kafka_broker, mock_backend, router, "n")
    ids: dict[str, str] = {}
    for i in range(120):
        key = "sk-acme" if i % 3 else "sk-globex"
        status, rid, _ = send(r, key, "/v1/inference" if i % 4 == 0 else "/v1/chat/completions")
        assert status == 200
        ids[rid] = key
    admitted, denied = denied_request(r)
    seen = consume(kafka_broker.bootstrap, topic, {*ids, *admitted, denied}, 30)
    assert_delivered(seen, {*ids, *admitted, denied})
    for rid, key in ids.items():
        assert len(seen[rid]) == 1  # nothing failed: exactly one copy
        msg_key, value = seen[rid][0]
        doc = json.loads(value)
        jsonschema.validate(doc, schema())
        org = "acme" if key == "sk-acme" else "globex"
        assert msg_key == org.encode() and doc["org"] == org
        assert doc["kind"] == "request" and doc["status"] == 200 and doc["error_code"] is None
        assert doc["backend_id"] == "a" and doc["model"] == "m" and doc["attempts"] == 1
        assert doc["decision_type"] == "PRIMARY"
        assert doc["prompt_tokens"] > 0 and doc["completion_tokens"] > 0
        assert doc["total_tokens"] == doc["prompt_tokens"] + doc["completion_tokens"]
        want_cost = round((doc["prompt_tokens"] * 1.0 + doc["completion_tokens"] * 2.0)
                          * 1_000_000 / 1000)
        assert doc["cost_micro"] == want_cost
        assert doc["total_latency_ms"] >= doc["backend_latency_ms"]
        assert doc["ts_end"] >= doc["ts_start"]
        assert "sk-" not in value.decode()  # key ids only, never keys
    denial = json.loads(seen[denied][0][1])
    jsonschema.validate(denial, schema())
    assert denial["kind"] == "denial" and denial["status"] == 429
    assert denial["error_code"] == "RATE_LIMIT_EXCEEDED" and denial["key_id"] == "k-tight"
    assert denial["limit"] == "key_rpm" and denial["retry_after_s"] >= 1
    assert metric(r, "router_usage_records_published_total") >= len(ids) + 2


def test_records_of_workers_killed_with_sigkill_right_after_answering_are_exported(
        kafka_broker: KafkaBroker, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    r, topic = kafka_router(kafka_broker, mock_backend, router, "kill")
    victims = worker_pids(r)
    ids = set()
    conns = [http.client.HTTPConnection(HOST, r.port, timeout=10) for _ in range(4)]
    for i in range(200):
        status, rid, _ = send(r, conn=conns[i % 4])
        assert status == 200
        ids.add(rid)
    for pid in victims:  # the last responses were just written: no time to "flush" anything
        os.kill(pid, 9)
    for c in conns:
        c.close()
    seen = consume(kafka_broker.bootstrap, topic, ids, 30)
    assert_delivered(seen, ids)
    wait_for(lambda: len(set(worker_pids(r)) - set(victims)) == 2, 30, "workers respawned")
    status, rid, _ = send(r)
    assert status == 200
    assert_delivered(consume(kafka_broker.bootstrap, topic, {rid}, 30), {rid})


def test_a_30_second_broker_outage_under_load_spools_then_drains(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    broker = KafkaBroker()  # its own broker: this test freezes it
    try:
        a = mock_backend("a")
        topic = "usage-outage"
        r = router(kafka_config(a.url, broker.bootstrap, topic), workers=2)
        wait_for(lambda: r.readyz()["checks"]["usage_sink"]["connected"], 10, "kafka up")
        ids: set[str] = set()
        lock = threading.Lock()
        stop = threading.Event()
        failures: list[int] = []

        def client() -> None:
            conn = http.client.HTTPConnection(HOST, r.port, timeout=10)
            for _ in range(20_000):  # bounded; the outage ends the loop long before
                if stop.is_set():
                    break
                status, rid, _ = send(r, conn=conn)
                with lock:
                    (ids.add(rid) if status == 200 else failures.append(status))
                time.sleep(0.01)
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        broker.pause()
        paused_at = time.monotonic()
        wait_for(lambda: not r.readyz()["checks"]["usage_sink"]["connected"], 10,
                 "readyz shows kafka down")
        assert r.readyz()["checks"]["usage_sink"]["status"] == "degraded"
        spool_peak = 0.0
        while time.monotonic() - paused_at < 30:
            spool_peak = max(spool_peak, metric(r, "router_usage_spool_bytes"))
            time.sleep(1)
        age = metric(r, "router_usage_spool_oldest_age_seconds")
        spooled = metric(r, "router_usage_records_spooled_total")
        broker.resume()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures  # clients never felt the outage
        assert spool_peak > 0 and spooled > 100 and age > 10
        seen = consume(broker.bootstrap, topic, ids, 60)
        assert_delivered(seen, ids)
        wait_for(lambda: metric(r, "router_usage_spool_bytes") == 0, 30, "spool drained")
        assert r.readyz()["checks"]["usage_sink"]["connected"]
        assert metric(r, "router_usage_records_replayed_total") >= spooled * 0.9
        spool = os.path.join(r.run_dir, "spool", "kafka")
        wait_for(lambda: not [n for n in os.listdir(spool) if n.endswith(".spool")], 10,
                 "spool truncated")
    finally:
        broker.resume()
        broker.stop()
        broker.cleanup()


def test_a_restarted_supervisor_replays_a_non_empty_spool(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    port = free_port()  # no broker there yet: everything goes to the spool
    cfg = kafka_config(a.url, f"{HOST}:{port}", "usage-restart")
    first = router(cfg, workers=1)
    assert not first.readyz()["checks"]["usage_sink"]["connected"]
    ids = set()
    for _ in range(50):
        status, rid, _ = send(first)
        assert status == 200
        ids.add(rid)
    wait_for(lambda: metric(first, "router_usage_records_spooled_total") >= 50, 10, "spooled")
    assert first.stop() == 0
    spool = os.path.join(first.run_dir, "spool", "kafka")
    assert [n for n in os.listdir(spool) if n.endswith(".spool")]
    broker = KafkaBroker(port)
    try:
        second = router(cfg, workers=1, run_dir=first.run_dir)
        seen = consume(broker.bootstrap, "usage-restart", ids, 30)
        assert_delivered(seen, ids)
        wait_for(lambda: not [n for n in os.listdir(spool) if n.endswith(".spool")], 10,
                 "spool truncated")
        assert second.readyz()["checks"]["usage_sink"]["status"] == "ok"
        # The broker dies and comes back empty: records made meanwhile are spooled, and
        # `apirouterctl usage --replay` sends them without waiting out the backoff.
        broker.stop(sig=signal.SIGKILL)
        broker.cleanup()
        later = {send(second)[1] for _ in range(20)}
        wait_for(lambda: not second.readyz()["checks"]["usage_sink"]["connected"], 15,
                 "kafka seen down")
        wait_for(lambda: usage_state(second)["spool_pending_bytes"] > 0, 10, "spooled")
        broker = KafkaBroker(port)
        state = usage_state(second, "--replay")
        assert state["usage_sink"]["kind"] == "kafka"
        assert_delivered(consume(broker.bootstrap, "usage-restart", later, 30), later)
        wait_for(lambda: usage_state(second)["spool_pending_bytes"] == 0, 10, "replayed")
    finally:
        broker.stop()
        broker.cleanup()


def usage_state(router: Router, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", "from tools.ctl import main; "
                          "raise SystemExit(main())", "--run-dir", router.run_dir, "--json",
                          "usage", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _get(router: Router, path: str, key: str | None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection(HOST, router.port, timeout=10)
    h = dict(headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    c.request("GET", path, headers=h)
    resp = c.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    c.close()
    return out


def _audit_checks(r: Router) -> None:
    status, rid, _ = send(r, "sk-acme")
    assert status == 200
    path = f"/v1/audit/requests/{rid}"
    wait_for(lambda: _get(r, path, "sk-acme")[0] == 200, 5, "audit record available")
    status, headers, body = _get(r, path, "sk-acme")
    doc = json.loads(body)
    jsonschema.validate(doc, schema())
    assert doc["request_id"] == rid and doc["org"] == "acme" and doc["backend_id"] == "a"
    tag, modified = headers["etag"], headers["last-modified"]
    assert tag.startswith('"') and modified.endswith("GMT")
    assert _get(r, path, "sk-acme", {"If-None-Match": tag})[0] == 304
    assert _get(r, path, "sk-acme", {"If-Modified-Since": modified})[0] == 304
    assert _get(r, path, "sk-acme", {"If-None-Match": '"other"'})[0] == 200
    status, headers, body = _get(r, path + "?fields=status,backend_id,total_tokens", "sk-acme")
    assert status == 200 and set(json.loads(body)) == {"status", "backend_id", "total_tokens"}
    assert headers["etag"] != tag  # a different body, a different tag
    status, _, body = _get(r, path + "?fields=status,api_key", "sk-acme")
    assert status == 400 and json.loads(body)["error"]["error_code"] == "INVALID_REQUEST"
    assert "api_key" in json.loads(body)["error"]["message"]
    # Another org's record is not found (not forbidden: ids cannot be probed).
    status, _, body = _get(r, path, "sk-globex")
    assert status == 404 and json.loads(body)["error"]["error_code"] == "REQUEST_NOT_FOUND"
    assert _get(r, path, "sk-admin")[0] == 200  # admin scope reads every org
    assert _get(r, path, "sk-tight")[0] == 403  # no audit scope
    assert _get(r, path, None)[0] == 401
    status, _, body = _get(r, "/v1/audit/requests/no-such-request", "sk-acme")
    assert status == 404 and json.loads(body)["error"]["error_code"] == "REQUEST_NOT_FOUND"
    # A denial is looked up like a request.
    _, denied = denied_request(r)
    wait_for(lambda: _get(r, f"/v1/audit/requests/{denied}", "sk-admin")[0] == 200, 5,
             "denial audit record")
    assert json.loads(_get(r, f"/v1/audit/requests/{denied}", "sk-admin")[2])["kind"] == "denial"


def test_audit_lookup_in_redis(kafka_broker: KafkaBroker, redis_server: RedisServer,
                               mock_backend: Callable[..., MockBackend],
                               router: Callable[..., Router]) -> None:
    r, _ = kafka_router(kafka_broker, mock_backend, router, "audit",
                        redis_url=redis_server.url, audit_ttl_s=600)
    assert r.readyz()["checks"]["audit_store"]["kind"] == "redis"
    _audit_checks(r)


def test_audit_lookup_and_jsonl_files_in_embedded_mode(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    cfg = kafka_config(a.url, "", "unused")
    r = router(cfg, workers=2)
    checks = r.readyz()["checks"]
    assert checks["audit_store"]["kind"] == "local" and checks["usage_sink"]["kind"] == "jsonl"
    _audit_checks(r)
    spool = os.path.join(r.run_dir, "spool")
    lines = [json.loads(line) for n in os.listdir(spool) if n.endswith(".jsonl")
             for line in open(os.path.join(spool, n))]
    assert len(lines) >= 3 and all(d["schema_version"] == 1 for d in lines)
