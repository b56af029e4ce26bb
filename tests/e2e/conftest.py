"""One router and its mock backends per test module: starting processes is the slow part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.harness import HOST, MockBackend, Router, free_port


@dataclass
class Deployment:
    router: Router
    mocks: dict[str, MockBackend]
    down_port: int

    @property
    def url(self) -> str:
        return self.router.url


def deployment_config(mocks: dict[str, MockBackend], down_port: int) -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": 65536, "request_timeout_s": 10, "auth_required": False},
        "backends": {
            "a": {"url": mocks["a"].url},
            "b": {"url": mocks["b"].url},
            "slow": {"url": mocks["slow"].url, "timeout_s": 0.5},
            "broken": {"url": mocks["broken"].url},
            "down": {"url": f"http://{HOST}:{down_port}"},
        },
        "models": {
            "gpt-ok": {"backends": [{"backend": "a", "weight": 1}]},
            "gpt-split": {"backends": [{"backend": "a", "weight": 3},
                                       {"backend": "b", "weight": 1}]},
            "gpt-slow": {"backends": ["slow"]},
            "gpt-broken": {"backends": ["broken"]},
            "gpt-down": {"backends": ["down"]},
        },
    }


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    mocks = {
        "a": MockBackend("a"),
        "b": MockBackend("b"),
        "slow": MockBackend("slow", "--latency-ms", "3000"),
        "broken": MockBackend("broken", "--error-rate", "1", "--error-status", "500"),
    }
    down_port = free_port()  # nothing listens there
    router = Router(deployment_config(mocks, down_port), workers=2)
    yield Deployment(router, mocks, down_port)
    for p in (router, *mocks.values()):
        p.stop()
        p.cleanup()


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, doc: Any, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], Any]:
    status, hdrs, body = request(url, "POST", json.dumps(doc).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    return status, hdrs, json.loads(body) if body else None


@pytest.fixture
def load_beside() -> Iterator[None]:
    """Busy processes on every core beside the router (bounded: they exit after 90 s), as
    on a shared host."""
    spin = "import time\nend = time.time() + 90\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    yield
    for p in procs:
        p.kill()
        p.wait()
