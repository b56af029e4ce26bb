"""HMAC-signed requests through real routers sharing a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from apirouter.keys import hash_key
from apirouter.signing import sign
from tests.e2e.conftest import request
from tests.harness import MockBackend, RedisServer, Router, router_config
from tools.sign_request import send

KEY = "ar-signed-key"
BODY = json.dumps({"model": "m", "prompt": "hello"}).encode()


def signed_post(r: Router, headers: dict[str, str], body: bytes = BODY) -> tuple[int, Any]:
    status, _, raw = request(f"{r.url}/v1/inference", "POST", body,
                             {"Authorization": f"Bearer {KEY}", **headers})
    return status, json.loads(raw)


def test_signed_requests_replays_and_clock_skew(
        redis_server: RedisServer, mock_backend: Callable[..., MockBackend],
        router: Callable[..., Router]) -> None:
    a = mock_backend("a")
    cfg = router_config({"a": a.url}, {"m": {"a": 1}}, redis_url=redis_server.url,
                        keys={"k-sig": {"sha256": hash_key(KEY), "org": "sig", "hmac": True}})
    r1, r2 = router(cfg, workers=2), router(cfg, workers=1)

    status, body = send(KEY, f"{r1.url}/v1/inference", BODY)
    assert status == 200 and json.loads(body)["router"]["backend_id"] == "a"

    headers = sign(KEY, "POST", "/v1/inference", BODY)
    assert signed_post(r1, headers)[0] == 200
    for r in (r1, r1, r2):  # the same nonce again: other worker, other instance
        status, body = signed_post(r, headers)
        assert status == 400 and "replay" in body["error"]["message"]

    skewed = sign(KEY, "POST", "/v1/inference", BODY, timestamp=int(time.time()) - 3600)
    status, body = signed_post(r2, skewed)
    assert status == 401 and "window" in body["error"]["message"]

    tampered = sign(KEY, "POST", "/v1/inference", BODY)
    status, body = signed_post(r2, tampered, BODY.replace(b"hello", b"bye"))
    assert status == 401 and "does not match" in body["error"]["message"]

    status, body = signed_post(r2, {})  # no signature header: says which ones to send
    assert status == 401 and body["error"]["error_code"] == "UNAUTHORIZED"
    assert "X-Signature-Timestamp" in body["error"]["message"]
    # ... on the lean server's endpoints too (it builds no signature fields when none came).
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, raw = request(f"{r2.url}/v1/chat/completions", "POST", chat,
                             {"Authorization": f"Bearer {KEY}"})
    assert status == 401 and "X-Signature-Timestamp" in json.loads(raw)["error"]["message"]
    signed_chat = sign(KEY, "POST", "/v1/chat/completions", chat)
    status, _, raw = request(f"{r2.url}/v1/chat/completions", "POST", chat,
                             {"Authorization": f"Bearer {KEY}", **signed_chat})
    assert status == 200, raw
    assert KEY not in r1.output() + r2.output()
