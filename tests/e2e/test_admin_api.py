"""The admin API over HTTP: auth, reads, overrides with TTL, audit, and etcd persistence."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import request
from tests.e2e.test_etcd_config import push
from tests.e2e.test_lifecycle import chat_backends
from tests.harness import EtcdServer, MockBackend, Router, router_config, wait_for

TOKEN = "s3cret-admin-token"
SHA = hashlib.sha256(TOKEN.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def admin(r: Router, method: str, path: str, doc: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = json.dumps(doc).encode() if doc is not None else None
    status, _, raw = request(f"{r.url}/v1/admin/routing{path}", method, body,
                             {**AUTH, **(headers or {})} if headers is None or headers else {})
    return status, json.loads(raw) if raw else None


def test_admin_auth(mock_backend: Callable[..., MockBackend],
                    router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    off = router(router_config({"a": a.url}, {"m": {"a": 1}}), workers=1)
    status, body = admin(off, "GET", "/table")
    assert status == 403 and body["error"]["error_code"] == "FORBIDDEN"
    on = router(router_config({"a": a.url}, {"m": {"a": 1}}, admin_token_sha256=SHA), workers=1)
    status, body = admin(on, "GET", "/table", headers={})
    assert status == 401 and body["error"]["error_code"] == "UNAUTHORIZED"
    status, body = admin(on, "GET", "/table", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["error_code"] == "INVALID_API_KEY"
    status, body = admin(on, "GET", "/table", headers={"X-API-Key": TOKEN})
    assert status == 200 and body["models"]["m"]["backends"] == [{"backend": "a", "weight": 1}]
    assert TOKEN not in on.output()


def test_overrides_through_the_admin_api(mock_backend: Callable[..., MockBackend],
                                         router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    r = router(router_config({"a": a.url, "b": b.url}, {"m": {"a": 1, "b": 1}},
                             admin_token_sha256=SHA), workers=2)
    status, backends = admin(r, "GET", "/backends")
    assert status == 200 and {x["id"]: x["state"] for x in backends["backends"]} == {
        "a": "healthy", "b": "healthy"}

    status, record = admin(r, "POST", "/overrides",
                           {"kind": "pin", "target": "m", "backend": "a", "ttl_s": 60})
    assert status == 201 and record["created_by"].startswith("admin-token from 127.0.0.1")
    assert chat_backends(r, 20) == {"a"}
    status, listed = admin(r, "GET", "/overrides")
    assert [o["id"] for o in listed["overrides"]] == [record["id"]]
    status, table = admin(r, "GET", "/table")
    assert table["models"]["m"]["pinned"] == "a"

    status, _ = admin(r, "DELETE", f"/overrides/{record['id']}")
    assert status == 200
    assert chat_backends(r, 30) == {"a", "b"}
    status, body = admin(r, "DELETE", f"/overrides/{record['id']}")
    assert status == 404 and body["error"]["error_code"] == "NOT_FOUND"

    status, body = admin(r, "POST", "/overrides", {"kind": "explode", "target": "m"})
    assert status == 400 and body["error"]["field"] == "kind"
    status, body = admin(r, "POST", "/overrides", {"kind": "pin", "target": "nope",
                                                   "backend": "a"})
    assert status == 404 and body["error"]["error_code"] == "MODEL_NOT_FOUND"
    status, body = admin(r, "POST", "/overrides", None)
    assert status == 400

    status, audit = admin(r, "GET", "/audit")
    assert [e["action"] for e in audit["entries"]] == ["override.set", "override.clear"]
    assert all(e["actor"].startswith("admin-token from") for e in audit["entries"])


def test_overrides_persist_in_etcd_and_reach_every_router(
        etcd_server: EtcdServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a, b = mock_backend("a"), mock_backend("b")
    prefix = f"/apirouter-admin-{uuid.uuid4().hex[:8]}"
    cfg = router_config({"a": a.url, "b": b.url}, {"m": {"a": 1, "b": 1}},
                        admin_token_sha256=SHA)
    assert push(etcd_server.endpoint, prefix, cfg).returncode == 0
    args = ["--etcd-prefix", prefix]
    r1 = router(None, etcd=etcd_server.endpoint, extra=args, workers=1)
    r2 = router(None, etcd=etcd_server.endpoint, extra=args, workers=1)
    status, record = admin(r1, "POST", "/overrides", {"kind": "drain", "target": "a",
                                                      "ttl_s": 2})
    assert status == 201
    wait_for(lambda: chat_backends(r2, 10) == {"b"}, 5, "the other router to apply it")
    assert chat_backends(r1, 10) == {"b"}
    _, listed = admin(r2, "GET", "/overrides")
    assert [o["id"] for o in listed["overrides"]] == [record["id"]]
    wait_for(lambda: chat_backends(r2, 20) == {"a", "b"}, 10, "expiry on every router")
