"""Review (issue 14 hot path): an idle keep-alive connection keeps nothing of its last request.

The lean server answers a connection's requests one at a time (workers/fast_server.py); once
one is answered the connection waits for the next. Whatever it keeps from the last stays
allocated for as long as the client holds the connection open, which clients with connection
pools (SDKs, proxies) do for minutes: per idle connection it must not be the last request's
body, its context or its reply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.harness import MockBackend, RawHttp, Router, raw_request, router_config, worker_processes

BODY_MB = 4
CONNECTIONS = 24


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    mock = MockBackend("a")
    r = Router(router_config({"a": mock.url}, {"m": {"a": 1}}, max_body_bytes=8 << 20),
               workers=1)
    yield r
    for p in (r, mock):
        p.stop()
        p.cleanup()


def test_idle_keep_alive_connections_do_not_hold_their_last_request(router: Router) -> None:
    (worker,) = worker_processes(router)
    big = json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "x" * (BODY_MB << 20)}]}).encode()
    conns = [RawHttp(router.port, timeout=20) for _ in range(CONNECTIONS)]
    try:
        base = worker.memory_info().rss
        for c in conns:  # one large request each, answered; the connection then stays idle
            c.send(raw_request("POST", "/v1/chat/completions", big,
                               {"Content-Type": "application/json"}))
            assert [r.status for r in c.read(1, 20)] == [200]
        time.sleep(1.5)  # the worker's sweep collects the young generations once a second
        held = worker.memory_info().rss - base
    finally:
        for c in conns:
            c.close()
    bodies = CONNECTIONS * len(big)
    # Nothing of the requests is needed any more: well under a quarter of their bodies.
    assert held < bodies / 4, (
        f"{CONNECTIONS} idle connections hold {held / 2**20:.0f} MiB after requests of "
        f"{len(big) / 2**20:.1f} MiB each ({held / bodies:.2f} bodies' worth)")
