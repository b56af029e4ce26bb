"""Hostile and malformed input, sent as an attacker would (raw sockets, no client library): every
request gets a 4xx that names the problem, never a 5xx."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from tests.harness import MockBackend, RawHttp, Router, raw_request, router_config

ADMIN_TOKEN = "hostile-admin-token"
MAX_BODY = 65536


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mock = MockBackend("a")
    cfg = router_config({"a": mock.url}, {"m": {"a": 1}}, max_body_bytes=MAX_BODY,
                        admin_token_sha256=hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    r = Router(cfg, workers=1)
    yield r
    for p in (r, mock):
        p.stop()
        p.cleanup()


def exchange(r: Router, payload: bytes) -> tuple[int, dict[str, str], dict]:
    with RawHttp(r.port) as c:
        c.send(payload)
        [resp] = c.read(1)
        return resp.status, resp.headers, resp.json()


def post(path: str, body: bytes, **headers: str) -> bytes:
    return raw_request("POST", path, body, {"Content-Type": "application/json", **headers})


DEEP = b'{"model":"m","messages":' + b"[" * 30_000 + b"]" * 30_000 + b"}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/inference"])
@pytest.mark.parametrize(("body", "field", "says"), [
    (b'{"model":"m","messages":[{"role":{},"content":"x"}]}', "messages[0].role", "role"),
    (b'{"model":"m","messages":[{"role":["user"],"content":"x"}]}', "messages[0].role", "role"),
    (b'{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":1e9}',
     "max_tokens", "max_tokens"),
    (DEEP, None, "nested deeper than 1024"),
])
def test_malformed_bodies_get_a_4xx_naming_the_problem(router: Router, path: str, body: bytes,
                                                       field: str | None, says: str) -> None:
    status, _, doc = exchange(router, post(path, body))
    assert status == 400, doc
    err = doc["error"]
    message = err["message"]
    assert says in message and err.get("field", err.get("param")) == field


@pytest.mark.parametrize("chunked", [False, True])
def test_admin_bodies_are_size_limited_like_inference_bodies(router: Router,
                                                             chunked: bool) -> None:
    big = json.dumps({"model": "m", "target": "a", "reason": "x" * (2 << 20)}).encode()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    with RawHttp(router.port) as c:
        if chunked:
            c.send(raw_request("POST", "/v1/admin/routing/overrides", None,
                               {**headers, "Transfer-Encoding": "chunked"}))
            for at in range(0, len(big), 65536):
                part = big[at:at + 65536]
                if not c.send(b"%x\r\n%s\r\n" % (len(part), part)):
                    break
            c.send(b"0\r\n\r\n")
        else:
            c.send(raw_request("POST", "/v1/admin/routing/overrides", big, headers))
        [resp] = c.read(1)
    assert resp.status == 413, resp
    assert resp.json()["error"]["error_code"] == "PAYLOAD_TOO_LARGE"
