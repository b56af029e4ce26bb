"""Review (pre-existing, found while reviewing issue 14's lean-server changes): a value that
cannot go into a response head must not cost the client its response.

The lean server renders a response head as one latin-1 string (workers/fast_server.py
``_head``). A backend id outside latin-1 (``gpu-東京``: the config accepts it) goes into
``X-Router-Backend``; the encode raised UnicodeEncodeError in the connection's task, the task
died with the connection marked busy, and the client got no response at all (the request was
forwarded, billed and recorded as a 200). Either the config refuses such an id, or the request
is answered.
"""

from __future__ import annotations

import json

from apirouter.config import ConfigError, parse_config
from tests.harness import MockBackend, RawHttp, Router, raw_request, router_config

BACKEND = "gpu-東京"


def test_a_backend_id_outside_latin1_is_refused_or_answered() -> None:
    mock = MockBackend("a")
    cfg = router_config({BACKEND: mock.url}, {"m": {BACKEND: 1}})
    try:
        try:
            parse_config(cfg)
        except ConfigError:
            return  # refused where the operator sees it
        r = Router(cfg, workers=1)
        try:
            with RawHttp(r.port, timeout=5) as c:
                c.send(raw_request("POST", "/v1/chat/completions", json.dumps(
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
                    {"Content-Type": "application/json"}))
                got = c.read(1, 5)
                assert len(got) == 1, "no response (the connection hung)"
        finally:
            r.stop()
            r.cleanup()
    finally:
        mock.stop()
        mock.cleanup()


