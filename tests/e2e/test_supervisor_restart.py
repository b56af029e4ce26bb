"""Supervisor loss and restart under load, with real processes.

- SIGKILL the supervisor while clients keep sending: the orphaned pool says so (readyz
  degraded, usage sink "no supervisor") and serves on; `apirouter serve` started again on the
  same run directory adopts the pool: every answered request gets its usage record, the port
  never refuses a connection, and no worker dies.
- Two routers on one run directory: the second refuses with a clear message and the first
  keeps every file it owns.
- As PID 1 of a fresh PID namespace (a container): SIGKILL, then start again in another fresh
  namespace with the same /dev/shm and run directory: the old records are exported, and a
  router outside the namespaces is left alone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import yaml

from apirouter.keys import hash_key
from tests.harness import (
    HOST,
    ROOT,
    ManagedProcess,
    MockBackend,
    Router,
    free_port,
    http_get,
    wait_for,
)

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 5})


def config(mock: str) -> dict[str, Any]:
    return {
        "server": {"auth_required": True},  # usage records: JSONL files in RUN_DIR/spool
        "backends": {"a": {"url": mock}},
        "models": {"m": {"backends": ["a"]}},
        "keys": {"k": {"sha256": hash_key("sk-load"), "org": "acme", "scopes": ["inference"],
                       "rpm": 10**7, "rpm_burst": 10**7, "tpm": 10**10, "tpm_burst": 10**10}},
    }


class Load:
    """Clients on fresh connections (so a moment without a listener shows as a refusal),
    recording every request id the router answered."""

    def __init__(self, port: int, clients: int = 3) -> None:
        self.port = port
        self.answered: set[str] = set()
        self.refused = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            c = http.client.HTTPConnection(HOST, self.port, timeout=10)
            try:
                c.request("POST", "/v1/chat/completions", CHAT,
                          {"Content-Type": "application/json",
                           "Authorization": "Bearer sk-load"})
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    self.answered.add(r.getheader("X-Request-ID") or "")
                else:
                    self.errors.append(f"status {r.status}")
            except ConnectionRefusedError:
                self.refused += 1
                time.sleep(0.01)
            except OSError as e:
                self.errors.append(repr(e))
            finally:
                c.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def exported(run_dir: str) -> set[str]:
    spool = os.path.join(run_dir, "spool")
    out = set()
    for name in os.listdir(spool) if os.path.isdir(spool) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(spool, name)) as f:
                out.update(json.loads(line)["request_id"] for line in f if line.strip())
    return out


def readyz(port: int) -> dict[str, Any]:
    status, body = http_get(f"http://{HOST}:{port}/v1/status/readyz", timeout=3)
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_a_killed_supervisor_is_replaced_under_load_without_a_lost_record_or_refusal(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    first = router(config(a.url), workers=2)
    gunicorn = psutil.Process(first.state()["gunicorn_pid"])
    wait_for(lambda: len(gunicorn.children()) == 2, 20, "both workers")
    workers = {p.pid for p in gunicorn.children()}
    load = Load(first.port)
    try:
        wait_for(lambda: len(load.answered) >= 200, 20, "load running")
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
        at_kill = len(load.answered)

        def orphaned() -> bool:  # each worker notices on its next heartbeat
            doc = readyz(first.port)
            return (doc["status"], doc["checks"]["supervisor"]["status"],
                    doc["checks"]["usage_sink"]["status"]) == ("degraded", "gone",
                                                               "no supervisor")

        wait_for(orphaned, 10, "the orphaned pool reports it")
        during = len(load.answered)
        wait_for(lambda: len(load.answered) >= during + 200, 20, "the orphan serves on")
        second = router(config(a.url), workers=2, run_dir=first.run_dir, port=first.port)
        # Each worker sees the new supervisor on its own next tick: a readyz answered by one of
        # them says nothing of the other (that race failed the checks below now and then).
        ready_in: set[int] = set()

        def every_worker_ready() -> bool:
            doc = readyz(first.port)
            if doc["status"] == "ready":
                ready_in.add(doc["worker_pid"])
            return ready_in >= workers

        wait_for(every_worker_ready, 15, "a supervisor again, seen by both workers")
        after = len(load.answered)
        wait_for(lambda: len(load.answered) >= after + 200, 20, "load after the takeover")
    finally:
        load.stop()
        if "second" not in locals():  # failed before the takeover: do not leak the orphans
            os.killpg(first.pid, signal.SIGKILL)
    print(f"answered {len(load.answered)} ({after - at_kill} with no supervisor), refused "
          f"{load.refused}, errors {len(load.errors)}")
    assert load.refused == 0 and not load.errors, (load.refused, load.errors[:5])
    # Adopted, not restarted: the same master and workers serve (no crash chain).
    assert second.state()["gunicorn_pid"] == gunicorn.pid
    assert {p.pid for p in gunicorn.children()} == workers
    answered = set(load.answered)

    def all_exported() -> bool:
        return answered <= exported(first.run_dir)

    wait_for(all_exported, 15, f"usage records of all {len(answered)} answered requests")
    checks = readyz(first.port)["checks"]
    assert checks["usage_sink"]["status"] == "ok" and checks["supervisor"]["status"] == "ok"
    os.kill(second.pid, signal.SIGTERM)
    assert second.proc.wait(30) == 0
    # The adopted pool stops with its new supervisor (a zombie left to whoever reaps orphans).
    assert not gunicorn.is_running() or gunicorn.status() == psutil.STATUS_ZOMBIE
    instance = open(os.path.join(first.run_dir, "instance")).read().strip()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"apirouter-{instance}-")]


def test_a_second_router_on_a_live_run_directory_is_refused_and_removes_nothing(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    first = router(config(a.url), workers=1)
    owned = sorted(os.listdir(first.run_dir))
    proc = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--config",
                           first.config_path, "--bind", f"{HOST}:{free_port()}",
                           "--run-dir", first.run_dir], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert f"run directory {first.run_dir} is in use by a live router" in proc.stderr
    assert f"supervisor pid {first.pid}" in proc.stderr and "--run-dir" in proc.stderr
    assert sorted(os.listdir(first.run_dir)) == owned
    assert first.readyz()["status"] == "ready"


@pytest.fixture
def pidns_run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="apirouter-pidns-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _pidns_router(run_dir: str, port: int) -> ManagedProcess:
    """`apirouter serve` as PID 1 of a new PID namespace, as a container runs it."""
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
           "tools.cli", "serve", "--config", os.path.join(run_dir, "router.yaml"),
           "--bind", f"{HOST}:{port}", "--workers", "2", "--run-dir", run_dir]
    proc = ManagedProcess("router-pidns", cmd, cwd=str(ROOT))

    def ready() -> bool:
        proc.ensure_running()
        try:
            return readyz(port)["status"] == "ready"
        except (OSError, ValueError):
            return False

    wait_for(ready, 30, "router in its own PID namespace")
    return proc


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="needs root and unshare for a PID namespace")
def test_pid1_in_a_fresh_pid_namespace_recovers_its_records_and_spares_other_routers(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router],
        pidns_run_dir: str) -> None:
    a = mock_backend("a")
    bystander = router(config(a.url), workers=1)
    state = bystander.state()
    spared = [state["table_segment"], state["stats_segment"], state["usage"]["segment"]]
    with open(os.path.join(pidns_run_dir, "router.yaml"), "w") as f:
        yaml.safe_dump(config(a.url), f)
    port = free_port()
    first = _pidns_router(pidns_run_dir, port)
    with open(os.path.join(pidns_run_dir, "supervisor.json")) as f:
        assert json.load(f)["pid"] == 1
    load = Load(port)
    try:
        wait_for(lambda: len(load.answered) >= 300, 20, "load running")
        # The namespace's PID 1 dies: the kernel kills every process in it, /dev/shm stays.
        init = psutil.Process(first.pid).children()[0]
        init.send_signal(signal.SIGKILL)
        first.proc.wait(15)
        load.stop()
        answered = set(load.answered)
        second = _pidns_router(pidns_run_dir, port)
        wait_for(lambda: answered <= exported(pidns_run_dir), 15,
                 f"usage records of all {len(answered)} answered requests")
        print(f"PID namespace: {len(answered)} answered before the kill, all exported after")
        assert bystander.readyz()["status"] == "ready"
        assert all(os.path.exists(f"/dev/shm/{n}") for n in spared) and spared
        psutil.Process(second.pid).children()[0].send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
    finally:
        load.stop()
        for p in ("first", "second"):
            proc = locals().get(p)
            if isinstance(proc, ManagedProcess):
                proc.cleanup()
