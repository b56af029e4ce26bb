"""HTTP/1.1 conformance of the lean server and its hand-off to aiohttp, over raw sockets:
exactly one response per request, always, and the keep-alive connection stays in step."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from tests.harness import MockBackend, RawHttp, Router, raw_request, router_config

ADMIN_TOKEN = "conformance-admin-token"
MAX_BODY = 65536
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
SLOW = json.dumps({"model": "slow", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mocks = [MockBackend("a"), MockBackend("slow", "--latency-ms", "300")]
    cfg = router_config({"a": mocks[0].url, "slow": mocks[1].url},
                        {"m": {"a": 1}, "slow": {"slow": 1}}, max_body_bytes=MAX_BODY,
                        admin_token_sha256=hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    r = Router(cfg, workers=1)
    yield r
    for p in (r, *mocks):
        p.stop()
        p.cleanup()


def chat(rid: str, body: bytes = CHAT, **headers: str) -> bytes:
    return raw_request("POST", "/v1/chat/completions", body,
                       {"Content-Type": "application/json", "X-Request-ID": rid, **headers})


def get(path: str, rid: str, **headers: str) -> bytes:
    return raw_request("GET", path, None, {"X-Request-ID": rid, **headers})


UPGRADES = {
    "websocket": {"Connection": "Upgrade", "Upgrade": "websocket",
                  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"},
    "h2c": {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
            "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"},
}


def in_step(c: RawHttp, rid: str) -> None:
    """One more request on the connection gets one response, and it is this request's."""
    before = len(c.responses)
    c.send(get("/v1/models", rid))
    c.read(before + 1)
    c.pump(0.3)
    assert len(c.responses) == before + 1, c.responses[before:]
    assert c.responses[-1].headers["x-request-id"] == rid


@pytest.mark.parametrize("upgrade", list(UPGRADES))
@pytest.mark.parametrize("path", ["/v1/status/healthz", "/v1/admin/routing/table"])
def test_upgrade_requests_get_one_response(router: Router, upgrade: str, path: str) -> None:
    """The router speaks HTTP/1.1 only: an Upgrade is ignored (RFC 9110 7.8), the request is
    answered once, and the requests after it on the connection are answered in step."""
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with RawHttp(router.port) as c:
        c.send(get(path, "up-1", **UPGRADES[upgrade], **auth) + get("/v1/models", "up-2"))
        c.read(2)
        c.pump(0.3)
        assert [(r.status, r.headers.get("x-request-id")) for r in c.responses] == [
            (200, "up-1"), (200, "up-2")], c.responses
        assert not c.closed
        in_step(c, "up-3")


@pytest.mark.parametrize("upgrade", list(UPGRADES))
def test_upgrade_on_a_post_with_a_body(router: Router, upgrade: str) -> None:
    with RawHttp(router.port) as c:
        c.send(chat("upb-1", **UPGRADES[upgrade]) + chat("upb-2"))
        c.read(2)
        c.pump(0.3)
        assert [(r.status, r.headers["x-request-id"]) for r in c.responses] == [
            (200, "upb-1"), (200, "upb-2")], c.responses
        in_step(c, "upb-3")


def test_pipelined_hot_requests_one_response_each_in_order(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(chat("p-0", SLOW) + b"".join(chat(f"p-{i}") for i in range(1, 6))
               + get("/v1/status/healthz", "p-6"))
        c.read(7, timeout=10)
        c.pump(0.3)
        assert [r.headers["x-request-id"] for r in c.responses] == [f"p-{i}" for i in range(7)]
        assert all(r.status == 200 for r in c.responses)
        in_step(c, "p-7")


def test_pipelined_requests_served_by_aiohttp_one_response_each(router: Router) -> None:
    """A connection whose first request is handed to aiohttp: aiohttp answers every
    pipelined request on it, hot or not, once each."""
    with RawHttp(router.port) as c:
        c.send(get("/metrics", "pa-0") + chat("pa-1") + get("/nope", "pa-2")
               + get("/v1/models", "pa-3"))
        c.read(4)
        c.pump(0.3)
        assert [r.status for r in c.responses] == [200, 200, 404, 200], c.responses
        assert [r.headers.get("x-request-id") for r in c.responses[1:]] == ["pa-1", "pa-2",
                                                                            "pa-3"]


def test_a_hand_off_pipelined_behind_hot_requests_gets_one_answer(router: Router) -> None:
    """Hot requests then one for aiohttp in the same packet: each hot one is answered, the
    other is refused with a 400 saying to send it on its own connection, and nothing more
    comes (the connection closes after it)."""
    with RawHttp(router.port) as c:
        c.send(chat("ph-1") + chat("ph-2") + get("/metrics", "ph-3"))
        c.read(3)
        c.pump(0.5)
        assert [r.status for r in c.responses] == [200, 200, 400], c.responses
        assert b"own connection" in c.responses[2].body
        assert c.closed


def test_expect_continue_then_one_final_response(router: Router) -> None:
    with RawHttp(router.port) as c:
        c.send(raw_request("POST", "/v1/chat/completions", None, {
            "Content-Type": "application/json", "Content-Length": str(len(CHAT)),
            "Expect": "100-continue", "X-Request-ID": "ec-1"}))
        assert [r.status for r in c.read(1)] == [100]
        c.send(CHAT)
        c.read(2)
        c.pump(0.3)
        assert [r.status for r in c.responses] == [100, 200]
        assert c.responses[1].headers["x-request-id"] == "ec-1"
        in_step(c, "ec-2")


def test_expect_continue_waits_for_earlier_responses(router: Router) -> None:
    """A 100 Continue belongs to the request being read: it must not overtake the response of
    a slow request pipelined before it (the client would take it for that one's)."""
    with RawHttp(router.port) as c:
        c.send(chat("eo-1", SLOW) + raw_request("POST", "/v1/chat/completions", None, {
            "Content-Type": "application/json", "Content-Length": str(len(CHAT)),
            "Expect": "100-continue", "X-Request-ID": "eo-2"}))
        c.read(2, timeout=10)
        assert [r.status for r in c.responses[:2]] == [200, 100], c.responses
        assert c.responses[0].headers["x-request-id"] == "eo-1"
        c.send(CHAT)
        c.read(3)
        assert [(r.status, r.headers.get("x-request-id")) for r in c.responses[2:]] == [
            (200, "eo-2")]


@pytest.mark.parametrize("path", ["/v1/inference", "/v1/admin/routing/overrides"])
def test_expect_continue_with_a_body_too_large_gets_only_the_413(router: Router,
                                                                path: str) -> None:
    with RawHttp(router.port) as c:
        c.send(raw_request("POST", path, None, {
            "Content-Type": "application/json", "Content-Length": str(MAX_BODY * 16),
            "Expect": "100-continue", "Authorization": f"Bearer {ADMIN_TOKEN}"}))
        c.read(1)
        c.pump(0.3)
        assert [r.status for r in c.responses] == [413], c.responses


def upload(c: RawHttp, head: bytes, total: int, chunked: bool, reading: bool) -> None:
    """Send a large body in pieces, as clients do: some read a response as it comes (curl,
    aiohttp), others only after the whole body is sent (requests, urllib)."""
    c.send(head)
    piece = b"x" * 65536
    sent = 0
    while sent < total and not c.responses:
        data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
        if not c.send(data):
            break
        sent += len(piece)
        if reading:
            c.pump(0.001)
    if chunked and not c.reset:
        c.send(b"0\r\n\r\n")


@pytest.mark.parametrize("reading", [True, False], ids=["reads-early", "reads-after"])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/inference", "/v1/chat/completions",
                                  "/v1/admin/routing/overrides"])
def test_a_body_refused_early_gets_its_413_to_the_client(router: Router, path: str,
                                                         chunked: bool, reading: bool) -> None:
    """The 413 goes out while the client is still uploading; the server then reads and
    discards (bounded) or half-closes, so the answer is not lost to a connection reset."""
    total = 4 << 20
    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(total)}
    head = raw_request("POST", path, None, {"Content-Type": "application/json",
                                            "Authorization": f"Bearer {ADMIN_TOKEN}",
                                            **framing})
    for _ in range(3):
        with RawHttp(router.port) as c:
            upload(c, head, total, chunked, reading)
            c.read(1)
            assert [r.status for r in c.responses] == [413], (c.responses, c.reset)
            assert b"PAYLOAD_TOO_LARGE" in c.responses[0].body.upper()
