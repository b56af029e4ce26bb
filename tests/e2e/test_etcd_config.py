"""etcd as the config store, with a real etcd: push, watch, reject, outage, boot from cache."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aetcd
import pytest
import yaml

from tests.e2e.test_lifecycle import chat_backends
from tests.harness import ROOT, EtcdServer, MockBackend, Router, router_config, wait_for


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from tools.ctl import main; "
                           "raise SystemExit(main())", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def push(etcd: str, prefix: str, cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    return ctl("--json", "config", "push", f.name, "--etcd", etcd, "--prefix", prefix)


def etcd_put(etcd: str, key: str, value: str) -> None:
    host, port = etcd.split(":")

    async def put() -> None:
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.put(key.encode(), value.encode())

    asyncio.run(put())


def store(router: Router) -> dict[str, Any]:
    result: dict[str, Any] = router.readyz()["checks"]["config_store"]
    return result


@pytest.fixture
def two_mocks(mock_backend: Callable[..., MockBackend]) -> dict[str, str]:
    return {"a": mock_backend("a").url, "b": mock_backend("b").url}


@pytest.fixture
def prefix() -> str:
    return f"/apirouter-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def own_etcd() -> Iterator[list[EtcdServer]]:
    """An etcd this test may stop and restart (the list holds the current process)."""
    servers = [EtcdServer()]
    yield servers
    servers[-1].stop()
    servers[-1].cleanup()


def test_push_get_watch_and_publish(etcd_server: EtcdServer, two_mocks: dict[str, str],
                                    prefix: str, router: Callable[..., Router]) -> None:
    out = push(etcd_server.endpoint, prefix, router_config(two_mocks, {"m": {"a": 1}}))
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)["revision"]
    r = router(None, etcd=etcd_server.endpoint, extra=["--etcd-prefix", prefix])
    assert store(r)["revision"] == first and store(r)["status"] == "ok"
    assert chat_backends(r) == {"a"}

    out = push(etcd_server.endpoint, prefix, router_config(two_mocks, {"m": {"b": 1}}))
    second = json.loads(out.stdout)["revision"]
    wait_for(lambda: store(r)["revision"] == second, 5, "watched change")
    assert chat_backends(r) == {"b"}

    got = ctl("--json", "config", "get", "--etcd", etcd_server.endpoint, "--prefix", prefix)
    assert json.loads(got.stdout)["config"]["models"] == {"m": {"backends": [
        {"backend": "b", "weight": 1}]}}
    unchanged = push(etcd_server.endpoint, prefix, router_config(two_mocks, {"m": {"b": 1}}))
    assert json.loads(unchanged.stdout) == {"changed": False, "keys": 4}  # server, 2, 1


def test_invalid_changes_are_rejected_and_the_last_good_table_stays(
        etcd_server: EtcdServer, two_mocks: dict[str, str], prefix: str,
        router: Callable[..., Router]) -> None:
    bad = router_config(two_mocks, {"m": {"ghost": 1}})
    out = push(etcd_server.endpoint, prefix, bad)
    assert out.returncode == 1 and "unknown backend 'ghost'" in out.stderr  # ctl validates

    push(etcd_server.endpoint, prefix, router_config(two_mocks, {"m": {"a": 1}}))
    r = router(None, etcd=etcd_server.endpoint, extra=["--etcd-prefix", prefix])
    # A writer that skips validation: the supervisor must refuse it on its own.
    etcd_put(etcd_server.endpoint, f"{prefix}/models/m", '{"backends": [{"backend": "ghost"}]}')
    wait_for(lambda: store(r)["rejected"] is not None, 5, "rejection")
    assert store(r)["status"] == "degraded"
    assert "unknown backend 'ghost'" in store(r)["rejected"]["reason"]
    assert chat_backends(r) == {"a"}
    assert json.loads(ctl("--run-dir", r.run_dir, "--json", "status").stdout)[
        "config_store"]["rejected"] is not None

    push(etcd_server.endpoint, prefix, router_config(two_mocks, {"m": {"b": 1}}))
    wait_for(lambda: store(r)["rejected"] is None, 5, "recovery")
    assert chat_backends(r) == {"b"}


def test_etcd_outage_keeps_serving_and_resyncs(own_etcd: list[EtcdServer],
                                               two_mocks: dict[str, str], prefix: str,
                                               router: Callable[..., Router]) -> None:
    etcd = own_etcd[0]
    push(etcd.endpoint, prefix, router_config(two_mocks, {"m": {"a": 1}}))
    r = router(None, etcd=etcd.endpoint, extra=["--etcd-prefix", prefix])
    etcd.stop()
    wait_for(lambda: store(r)["connected"] is False, 10, "outage noticed")
    assert store(r)["status"] == "degraded" and store(r)["last_error"]
    assert r.readyz()["status"] == "ready"  # still serving the last good table
    assert chat_backends(r) == {"a"}

    own_etcd.append(etcd.restarted())
    out = push(etcd.endpoint, prefix, router_config(two_mocks, {"m": {"b": 1}}))
    revision = json.loads(out.stdout)["revision"]
    wait_for(lambda: store(r)["connected"] and store(r)["revision"] == revision, 20, "resync")
    assert chat_backends(r) == {"b"}


def test_boot_from_cache_while_etcd_is_down(own_etcd: list[EtcdServer],
                                            two_mocks: dict[str, str], prefix: str,
                                            tmp_path: Any, router: Callable[..., Router]) -> None:
    etcd = own_etcd[0]
    cache = str(tmp_path / "cache")
    args = ["--etcd-prefix", prefix, "--cache-dir", cache]
    push(etcd.endpoint, prefix, router_config(two_mocks, {"m": {"b": 1}}))
    first = router(None, etcd=etcd.endpoint, extra=args)
    assert chat_backends(first) == {"b"}
    assert first.stop() == 0
    etcd.stop()

    r = router(None, etcd=etcd.endpoint, extra=args)
    assert store(r)["from_cache"] is True and store(r)["connected"] is False
    assert chat_backends(r) == {"b"}
    assert "serving the cached config" in r.output()

    own_etcd.append(etcd.restarted())
    wait_for(lambda: store(r)["connected"] is True, 20, "reconnect")
    assert store(r)["status"] == "ok"


def test_no_etcd_and_no_cache_refuses_to_start(tmp_path: Any) -> None:
    out = subprocess.run([sys.executable, "-m", "tools.cli", "serve", "--etcd", "127.0.0.1:9",
                          "--run-dir", str(tmp_path), "--bind", "127.0.0.1:0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "no cached config" in out.stderr
