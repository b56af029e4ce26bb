"""API keys through the real router: both servers, the official client, scopes, revocation."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import openai
import orjson
import pytest

from apirouter.keys import hash_key
from tests.e2e.conftest import post_json, request
from tests.e2e.test_lifecycle import generations_by_worker
from tests.harness import MockBackend, RawHttp, Router, raw_request, router_config, wait_for

USER = [{"role": "user", "content": "x"}]
KEYS = {
    "k-infer": {"sha256": hash_key("ar-infer"), "org": "acme", "scopes": ["inference"]},
    "k-audit": {"sha256": hash_key("ar-audit"), "org": "acme", "scopes": ["audit"]},
    "k-admin": {"sha256": hash_key("ar-admin"), "org": "ops", "scopes": ["admin"]},
}


@pytest.fixture
def keyed(mock_backend: Callable[..., MockBackend],
          router: Callable[..., Router]) -> tuple[Router, MockBackend]:
    a = mock_backend("a")
    return router(router_config({"a": a.url}, {"m": {"a": 1}}, keys=KEYS), workers=2), a


def test_openai_client_with_keys(keyed: tuple[Router, MockBackend]) -> None:
    r, _ = keyed

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{r.url}/v1", api_key=key, max_retries=0)

    assert client("ar-infer").chat.completions.create(model="m", messages=USER).choices
    assert [m.id for m in client("ar-infer").models.list()] == ["m"]
    with pytest.raises(openai.AuthenticationError) as e:
        client("ar-nope").chat.completions.create(model="m", messages=USER)
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.PermissionDeniedError) as e2:
        client("ar-audit").chat.completions.create(model="m", messages=USER)
    assert e2.value.code == "forbidden"


def test_native_endpoint_headers_and_envelope(keyed: tuple[Router, MockBackend]) -> None:
    r, _ = keyed
    url = f"{r.url}/v1/inference"
    status, _, body = post_json(url, {"model": "m", "prompt": "x"})
    assert status == 401 and body["error"]["error_code"] == "UNAUTHORIZED"
    status, _, body = post_json(url, {"model": "m", "prompt": "x"}, {"X-API-Key": "ar-infer"})
    assert status == 200 and body["router"]["backend_id"] == "a"
    status, _, body = post_json(url, {"model": "m", "prompt": "x"},
                                {"Authorization": "Bearer ar-wrong"})
    assert status == 401 and body["error"]["error_code"] == "INVALID_API_KEY"
    status, _, _ = request(f"{r.url}/v1/status/readyz")
    assert status == 200  # probes stay open
    assert "ar-infer" not in r.output() and "ar-wrong" not in r.output()


def test_admin_endpoints_need_the_admin_scope(keyed: tuple[Router, MockBackend]) -> None:
    r, _ = keyed
    url = f"{r.url}/v1/admin/routing/table"
    assert request(url, headers={"Authorization": "Bearer ar-infer"})[0] == 403
    assert request(url, headers={"Authorization": "Bearer ar-admin"})[0] == 200
    assert request(url)[0] == 401


def test_revocation_reaches_every_worker(keyed: tuple[Router, MockBackend]) -> None:
    r, a = keyed
    ok = {"Authorization": "Bearer ar-infer"}
    assert post_json(f"{r.url}/v1/chat/completions", {"model": "m", "messages": USER}, ok)[0] \
        == 200
    before = max(generations_by_worker(r, 2).values())
    r.write_config(router_config({"a": a.url}, {"m": {"a": 1}},
                                 keys={k: v for k, v in KEYS.items() if k != "k-infer"}))
    os.kill(r.pid, signal.SIGHUP)
    wait_for(lambda: min(generations_by_worker(r, 2).values()) > before, 5, "all workers")
    for _ in range(20):  # fresh connections land on both workers
        status, _, body = post_json(f"{r.url}/v1/chat/completions",
                                    {"model": "m", "messages": USER}, ok)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_keys_created_and_revoked_with_apirouterctl(
        mock_backend: Callable[..., MockBackend], router: Callable[..., Router]) -> None:
    import json

    from tests.e2e.test_lifecycle import ctl

    a = mock_backend("a")
    r = router(router_config({"a": a.url}, {"m": {"a": 1}}, keys=KEYS), workers=2)
    out = ctl(r, "--json", "keys", "create", "--org", "globex", "--scopes", "inference",
              "--tier", "viewer")
    created = json.loads(out.stdout)
    key = created["key"]
    assert key.startswith("ar-") and "sha256" not in created
    headers = {"Authorization": f"Bearer {key}"}
    wait_for(lambda: post_json(f"{r.url}/v1/chat/completions",
                               {"model": "m", "messages": USER}, headers)[0] == 200, 5, "key")
    listed = {k["key_id"]: k for k in json.loads(ctl(r, "--json", "keys", "list").stdout)}
    assert listed[created["key_id"]]["managed"] and listed[created["key_id"]]["org"] == "globex"
    assert not listed["k-infer"]["managed"]
    assert key not in ctl(r, "--json", "keys", "list").stdout

    assert ctl(r, "keys", "revoke", created["key_id"]).returncode == 0
    for _ in range(20):
        assert post_json(f"{r.url}/v1/chat/completions", {"model": "m", "messages": USER},
                         headers)[0] == 401
    out = ctl(r, "keys", "revoke", "k-infer")
    assert out.returncode == 1 and "config file" in out.stderr
    assert ctl(r, "keys", "create", "--org", "x", "--scopes", "root").returncode == 1
    actions = [e["action"] for e in json.loads(ctl(r, "--json", "audit").stdout)]
    assert actions == ["key.create", "key.revoke"]
    assert key not in r.output()


def test_a_connection_that_changes_keys_is_judged_by_each_request_s_key(
        keyed: tuple[Router, MockBackend]) -> None:
    """The lean server keeps a connection's last Authorization header with its key's hash, so
    the next request with the same header skips the hash: a client that changes keys (or
    drops its key) mid-connection is still judged by each request's own."""
    r, _ = keyed
    body = orjson.dumps({"model": "m", "messages": USER})
    sends: list[tuple[dict[str, str], int]] = [
        ({"Authorization": "Bearer ar-infer"}, 200),
        ({"Authorization": "Bearer ar-infer"}, 200),
        ({"Authorization": "Bearer ar-audit"}, 403),  # a valid key without the scope
        ({"Authorization": "Bearer ar-infer-"}, 401),  # one byte more
        ({"Authorization": "Bearer ar-infe"}, 401),  # one byte less
        ({"Authorization": "Bearer ar-infer"}, 200),
        ({}, 401),  # no key at all
        ({"Authorization": "Bearer ar-infer", "X-API-Key": "ar-nope"}, 200),  # Bearer wins
        ({"Authorization": "Basic ar-infer"}, 401),  # not a bearer token
        ({"X-API-Key": "ar-infer"}, 200),
        ({"Authorization": "Bearer ar-infer"}, 200),
    ]
    with RawHttp(r.port) as c:
        for i, (headers, _) in enumerate(sends):
            assert c.send(raw_request("POST", "/v1/chat/completions", body,
                                      {"Content-Type": "application/json", **headers}))
            c.read(i + 1)
        got = [resp.status for resp in c.responses]
    assert got == [status for _, status in sends]
    assert not c.closed and not c.reset  # all on the one keep-alive connection
