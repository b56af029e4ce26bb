"""The process tree as an operator drives it: HUP reload, bad reloads, drain, worker crashes,
and apirouterctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from apirouter.runstate import pid_alive
from tests.e2e.conftest import post_json, request
from tests.harness import ROOT, MockBackend, Router, http_get, router_config, wait_for

USER = [{"role": "user", "content": "x"}]


def generations_by_worker(router: Router, want_workers: int, attempts: int = 400) -> dict[int, int]:
    """Hit readyz on fresh connections until every worker has answered at least once."""
    seen: dict[int, int] = {}
    for _ in range(attempts):
        body = json.loads(http_get(f"{router.url}/v1/status/readyz")[1])
        seen[body["worker_pid"]] = body["checks"]["routing_table"]["generation"]
        if len(seen) >= want_workers:
            break
    return seen


def chat_backends(router: Router, n: int = 20) -> set[str]:
    backends = set()
    for _ in range(n):
        status, headers, _ = post_json(f"{router.url}/v1/chat/completions",
                                       {"model": "m", "messages": USER})
        assert status == 200
        backends.add(headers["X-Router-Backend"])
    return backends


def test_hup_reload_reaches_every_worker_without_restart(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    urls = {"a": a.url, "b": b.url}
    r = router(router_config(urls, {"m": {"a": 1}}), workers=2)
    before = generations_by_worker(r, 2)
    assert set(before.values()) == {2} and len(before) == 2
    assert chat_backends(r) == {"a"}

    r.write_config(router_config(urls, {"m": {"b": 1}, "m2": {"a": 1}}))
    os.kill(r.pid, signal.SIGHUP)
    wait_for(lambda: r.state()["generation"] == 4, 5, "new generation")
    after = generations_by_worker(r, 2)
    assert after.keys() == before.keys(), "the same workers, not restarted ones"
    assert set(after.values()) == {4}
    assert chat_backends(r) == {"b"}


def test_invalid_reload_keeps_the_last_good_table(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    r = router(router_config({"a": a.url}, {"m": {"a": 1}}), workers=1)
    r.write_config({"backends": {"a": {"url": a.url}},
                    "models": {"m": {"backends": [{"backend": "ghost"}]}}})
    os.kill(r.pid, signal.SIGHUP)
    wait_for(lambda: r.state()["reload_failures"] == 1, 5, "rejected reload")
    store = r.readyz()["checks"]["config_store"]
    assert store["status"] == "ok" and "unknown backend 'ghost'" in store["rejected"]["reason"]
    assert chat_backends(r, 3) == {"a"}  # the last good routes stay in force
    assert "unknown backend 'ghost'" in r.output()


def test_sigterm_drains_in_flight_requests_and_leaves_nothing_behind(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    slow = mock_backend("slow", "--latency-ms", "1500")
    r = router(router_config({"slow": slow.url}, {"m": {"slow": 1}}), workers=2)
    state = r.state()
    segment = f"/dev/shm/{state['table_segment']}"
    assert os.path.exists(segment) and os.path.isdir(state["metrics_dir"])
    result: dict[str, Any] = {}

    def in_flight() -> None:
        result["status"], result["headers"], result["body"] = post_json(
            f"{r.url}/v1/chat/completions", {"model": "m", "messages": USER})

    t = threading.Thread(target=in_flight)
    t.start()
    wait_for(lambda: slow.stats()["requests"] >= 1, 5, "request reached the backend")
    os.kill(r.pid, signal.SIGTERM)
    t.join(10)
    assert result["status"] == 200, "the in-flight request finished during the drain"
    assert r.proc.wait(20) == 0
    assert not os.path.exists(segment)
    assert not any(n.startswith(f"apirouter-{state['instance']}-") for n in os.listdir("/dev/shm"))
    assert not os.path.exists(state["metrics_dir"])
    assert not os.path.exists(os.path.join(r.run_dir, "supervisor.json"))


def test_killed_worker_is_replaced_and_reads_the_table(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    r = router(router_config({"a": a.url}, {"m": {"a": 1}}), workers=2)
    victim = next(iter(generations_by_worker(r, 2)))
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        seen = generations_by_worker(r, 2, attempts=50)
        return len(seen) == 2 and victim not in seen and set(seen.values()) == {2}

    wait_for(replaced, 20, "replacement worker")
    assert chat_backends(r, 5) == {"a"}


def ctl(r: Router, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from tools.ctl import main; "
                           "raise SystemExit(main())", "--run-dir", r.run_dir, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_apirouterctl_status_dump_reload_scale_stop(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    urls = {"a": a.url, "b": b.url}
    r = router(router_config(urls, {"m": {"a": 2, "b": 1}}), workers=1)

    status = json.loads(ctl(r, "--json", "status").stdout)
    assert status["supervisor_pid"] == r.pid and status["table_generation"] == 2
    assert status["models"] == ["m"] and len(status["worker_pids"]) == 1

    table = json.loads(ctl(r, "--json", "dump-table").stdout)
    assert table["models"]["m"]["backends"] == [{"backend": "a", "weight": 2},
                                                {"backend": "b", "weight": 1}]
    assert table["backends"]["a"]["url"] == a.url
    assert table["backends"]["a"]["state"] == "healthy"

    r.write_config(router_config(urls, {"m": {"b": 1}}))
    out = ctl(r, "--json", "reload")
    assert out.returncode == 0 and json.loads(out.stdout)["generation"] > 2
    r.write_config({"models": {"m": {"backends": ["nope"]}}})
    out = ctl(r, "reload")
    assert out.returncode == 1 and "reload rejected" in out.stderr and "nope" in out.stderr

    def workers() -> int:
        return len(json.loads(ctl(r, "--json", "status").stdout)["worker_pids"])

    # Several steps at once: each signal must reach gunicorn on its own (two identical signals
    # delivered together are one signal).
    assert ctl(r, "scale", "up", "2").returncode == 0
    wait_for(lambda: workers() == 3, 20, "scaled-up pool")
    assert ctl(r, "scale", "down", "2").returncode == 0
    wait_for(lambda: workers() == 1, 20, "scaled-down pool")

    out = ctl(r, "--json", "stop")
    assert json.loads(out.stdout) == {"stopped": True}
    assert r.proc.wait(5) == 0
    out = ctl(r, "status")
    assert out.returncode == 3 and "no router is running" in out.stderr


def test_overrides_drain_pin_weights_with_ttl_and_audit(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    r = router(router_config({"a": a.url, "b": b.url}, {"m": {"a": 1, "b": 1}}), workers=2)

    drained = json.loads(ctl(r, "--json", "drain", "a", "--ttl", "1.5").stdout)
    assert drained["kind"] == "drain" and drained["created_by"].startswith("uid:")
    assert chat_backends(r, 30) == {"b"}  # every worker sees it right away
    wait_for(lambda: chat_backends(r, 20) == {"a", "b"}, 10, "drain to expire")

    pinned = json.loads(ctl(r, "--json", "pin", "m", "b").stdout)
    status, headers, _ = post_json(f"{r.url}/v1/chat/completions",
                                   {"model": "m", "messages": USER})
    assert headers["X-Router-Backend"] == "b" and headers["X-Router-Decision"] == "OVERRIDE"
    assert ctl(r, "overrides", "--clear", pinned["id"]).returncode == 0

    assert ctl(r, "weights", "m", "a=0,b=5").returncode == 0
    assert chat_backends(r, 20) == {"b"}
    listed = json.loads(ctl(r, "--json", "overrides").stdout)
    assert [o["kind"] for o in listed] == ["weights"]
    assert ctl(r, "weights", "m", "a=0,b=0").returncode == 1  # would leave no weight
    assert ctl(r, "drain", "ghost").returncode == 1

    actions = [e["action"] for e in json.loads(ctl(r, "--json", "audit").stdout)]
    assert actions == ["override.set", "override.expired", "override.set", "override.clear",
                       "override.set"]


def test_demo_mode_serves_out_of_the_box(router: Callable[..., Router]) -> None:
    r = router(None, demo=True, workers=1)
    status, _, body = post_json(f"{r.url}/v1/chat/completions",
                                {"model": "gpt-4o-mini", "messages": USER})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, headers, body = post_json(f"{r.url}/v1/chat/completions",
                                      {"model": "gpt-4o-mini", "messages": USER},
                                      {"Authorization": "Bearer demo"})
    assert status == 200 and headers["X-Router-Backend"] in {"mock-a", "mock-b"}
    assert body["object"] == "chat.completion"
    status, _, _ = request(f"{r.url}/v1/admin/routing/table", headers={"X-API-Key": "demo"})
    assert status == 200
    mocks = [p for p in _children(r.pid) if "tools.mock_backend" in _cmdline(p)]
    assert len(mocks) == 2
    assert r.stop() == 0
    assert "supervisor stopped" in r.output()
    assert not any(pid_alive(p) for p in mocks), "demo backends stop with the router"


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()
