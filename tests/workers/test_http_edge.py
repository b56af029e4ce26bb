"""Pure pieces of the HTTP edge (workers/fast_server.py), without sockets."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from workers.fast_server import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    _without_upgrade,
    handoff_server_args,
)


def test_without_upgrade_drops_only_the_upgrade_line_of_the_first_head() -> None:
    req = (b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"UPGRADE: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n"
           b"GET /v1/models HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
    assert _without_upgrade(req) == (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMA\r\n\r\n"
        b"GET /v1/models HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")


def test_without_upgrade_leaves_an_incomplete_head_and_bodies_alone() -> None:
    assert _without_upgrade(b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n") == (
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n")
    req = b"POST /x HTTP/1.1\r\nContent-Length: 12\r\n\r\nUpgrade: h2c"
    assert _without_upgrade(req) == req


def test_aiohttp_never_refuses_what_the_lean_server_accepted() -> None:
    args = handoff_server_args()
    assert args["max_field_size"] >= MAX_HEADER_BYTES
    assert args["max_line_size"] >= MAX_HEADER_BYTES + len("OPTIONS  HTTP/1.1")
    assert args["max_headers"] >= MAX_HEADERS


@pytest.mark.parametrize("exc", [BadHttpMessage("bad header"), LineTooLong("x" * 300, 16384)])
def test_a_clients_malformed_request_is_one_debug_line(caplog: pytest.LogCaptureFixture,
                                                       exc: Exception) -> None:
    log = handoff_server_args()["logger"]
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert "127.0.0.1" in record.getMessage() and "400" in record.getMessage()


def test_a_server_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = handoff_server_args()["logger"]
    try:
        raise RuntimeError("handler bug")
    except RuntimeError as e:
        with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
            log.exception("Error handling request from %s", "127.0.0.1", exc_info=e)
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
