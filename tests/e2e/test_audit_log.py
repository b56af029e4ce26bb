"""The audit trail a worker leaves: JSON log lines for refusals (never a key or a prompt), and
audit lookups that a client-chosen request id cannot shadow across orgs."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable

import pytest

from apirouter.keys import hash_key
from tests.harness import HOST, MockBackend, RedisServer, Router, wait_for

PROMPT = "my-very-private-prompt-text"


def _config(mock: str) -> dict[str, object]:
    keys = {
        "k-tight": {"sha256": hash_key("sk-tight-secret"), "org": "acme",
                    "scopes": ["inference"], "rpm": 1, "rpm_burst": 1},
        "k-acme": {"sha256": hash_key("sk-acme-secret"), "org": "acme",
                   "scopes": ["inference", "audit"]},
        "k-globex": {"sha256": hash_key("sk-globex-secret"), "org": "globex",
                     "scopes": ["inference", "audit"]},
    }
    return {"server": {"auth_required": True}, "backends": {"a": {"url": mock}},
            "models": {"m": {"backends": ["a"]}}, "keys": keys}


def _call(r: Router, method: str, path: str, key: str, body: str | None = None,
          request_id: str | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(HOST, r.port, timeout=10)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if request_id:
        headers["X-Request-ID"] = request_id
    c.request(method, path, body, headers)
    resp = c.getresponse()
    data = resp.read()
    c.close()
    return resp.status, data


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}]})


def test_refusals_are_json_audit_lines_without_keys_or_prompts(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    r = router(_config(mock_backend("a").url), workers=1)
    statuses = [_call(r, "POST", "/v1/chat/completions", "sk-tight-secret", CHAT)[0]
                for _ in range(3)]
    assert 429 in statuses
    assert _call(r, "POST", "/v1/chat/completions", "sk-not-a-key-secret", CHAT)[0] == 401

    def audit_lines() -> list[dict[str, object]]:
        out = []
        for line in r.output().splitlines():
            if line.startswith("{") and '"apirouter.audit"' in line:
                out.append(json.loads(line))
        return out

    wait_for(lambda: {e.get("event") for e in audit_lines()} >= {"admission.denied",
                                                                 "auth.denied"},
             10, "audit lines for the 429 and the 401")
    denied = [e for e in audit_lines() if e["event"] == "admission.denied"][0]
    assert denied["key_id"] == "k-tight" and denied["org"] == "acme" and denied["limit"]
    assert "retry_after_s" in denied and "remaining" in denied
    text = r.output()
    assert "secret" not in text and PROMPT not in text


@pytest.fixture(params=["local", "redis"])
def audit_router(request: pytest.FixtureRequest, mock_backend: Callable[..., MockBackend],
                 router: Callable[..., Router]) -> Router:
    """A router whose audit store is the local one, or Redis (with redis_url)."""
    cfg = _config(mock_backend("a").url)
    if request.param == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        cfg["server"] = {"auth_required": True, "redis_url": redis.url}
    return router(cfg, workers=1)


def test_a_reused_request_id_does_not_hide_another_orgs_record(audit_router: Router) -> None:
    r = audit_router
    rid = "client-chosen-id-42"
    assert _call(r, "POST", "/v1/chat/completions", "sk-acme-secret", CHAT, rid)[0] == 200
    assert _call(r, "POST", "/v1/chat/completions", "sk-globex-secret", CHAT, rid)[0] == 200
    path = f"/v1/audit/requests/{rid}"
    wait_for(lambda: _call(r, "GET", path, "sk-globex-secret")[0] == 200, 10,
             "globex's record under the id acme used first")
    for key, org in (("sk-acme-secret", "acme"), ("sk-globex-secret", "globex")):
        status, body = _call(r, "GET", path, key)
        assert status == 200 and json.loads(body)["org"] == org


def test_an_id_shaped_like_another_orgs_key_cannot_block_its_record(audit_router: Router) -> None:
    """Request ids may contain ':'. globex sends 'acme:req-7' before acme sends 'req-7': neither
    may take the other's place in the store."""
    r = audit_router
    assert _call(r, "POST", "/v1/chat/completions", "sk-globex-secret", CHAT, "acme:req-7")[0] \
        == 200
    wait_for(lambda: _call(r, "GET", "/v1/audit/requests/acme:req-7", "sk-globex-secret")[0]
             == 200, 10, "globex's record")
    assert _call(r, "POST", "/v1/chat/completions", "sk-acme-secret", CHAT, "req-7")[0] == 200
    wait_for(lambda: _call(r, "GET", "/v1/audit/requests/req-7", "sk-acme-secret")[0] == 200,
             10, "acme's record")
    status, body = _call(r, "GET", "/v1/audit/requests/req-7", "sk-acme-secret")
    assert json.loads(body)["org"] == "acme" and json.loads(body)["request_id"] == "req-7"
    status, body = _call(r, "GET", "/v1/audit/requests/acme:req-7", "sk-globex-secret")
    assert status == 200 and json.loads(body)["org"] == "globex"
    assert _call(r, "GET", "/v1/audit/requests/acme:req-7", "sk-acme-secret")[0] == 404
