"""The bench suite's HTTP client: a bounded keep-alive pool per leg - the lean httptools
client (bench/rawclient.py) for http:// targets, aiohttp for https://.

``HttpTarget.send`` fills a ``Sample`` from one POST: status, the router's headers, the error
code of an error body, usage of a 200 when asked, and for SSE the time of the first event and
the gaps between events. ``RetryAfterClient`` wraps it as a polite client: after a 429 it sends
nothing until the Retry-After has passed (requests due meanwhile are withheld, not sent).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from bench.loadgen import WITHHELD, Sample, clock
from bench.rawclient import RawPool


class HttpTarget:
    def __init__(self, url: str, body: bytes, *, key: str | None = None, stream: bool = False,
                 max_connections: int = 64, timeout_s: float = 10.0,
                 want_usage: bool = False, lean: bool = True) -> None:
        self.url = url
        self.body = body
        self.stream = stream
        self.want_usage = want_usage
        self.router_block = url.endswith("/v1/inference")  # carries backend_latency_ms
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.lean = lean and url.startswith("http://")
        self.session: aiohttp.ClientSession | None = None
        self.pool: RawPool | None = None
        self.request = b""

    @property
    def client(self) -> str:
        return "httptools" if self.lean else "aiohttp"

    async def __aenter__(self) -> HttpTarget:
        if self.lean:
            self.pool = RawPool(self.url, self.max_connections)
            self.request = self.pool.head(self.headers, self.body) + self.body
            return self
        connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                         force_close=False, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()
        if self.pool is not None:
            self.pool.close()

    def _events(self, s: Sample, due: float) -> Callable[[bytes], None]:
        last: float | None = None

        def on_event(line: bytes) -> None:
            nonlocal last
            now = clock()
            if last is None:
                s.ttft = now - due
            else:
                s.event_gaps.append(now - last)
            last = now
            if self.want_usage and b'"usage"' in line:
                s.usage = _usage(json.loads(line[5:]))

        return on_event

    async def send(self, s: Sample) -> None:
        due = clock() - s.lag
        if self.pool is not None:
            async with asyncio.timeout(self.timeout_s):
                r = await self.pool.post(self.request,
                                         self._events(s, due) if self.stream else None)
            self._fill(s, r.status, r.headers, bytes(r.body))
            return
        assert self.session is not None, "use HttpTarget as an async context manager"
        async with self.session.post(self.url, data=self.body, headers=self.headers) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            if self.stream and resp.status == 200 and headers.get(
                    "content-type", "").startswith("text/event-stream"):
                on_event = self._events(s, due)
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        on_event(line)
                body = b""
            else:
                body = await resp.read()
        self._fill(s, resp.status, headers, body)

    def _fill(self, s: Sample, status: int, h: Mapping[str, str], body: bytes) -> None:
        """Status, the router's headers and what the body says (lower-case header names)."""
        s.status = status
        if (v := h.get("x-router-latency-ms")) is not None:
            s.router_ms = float(v)
        s.decision = h.get("x-router-decision", "")
        if (ra := h.get("retry-after")) is not None:
            s.retry_after = float(ra)
        if status >= 400:
            s.error = _error_code(body)
        elif body and (self.want_usage or self.router_block):
            doc = json.loads(body)
            s.usage = _usage(doc)
            router = doc.get("router") if isinstance(doc, dict) else None
            if isinstance(router, dict) and "backend_latency_ms" in router:
                s.backend_ms = float(router["backend_latency_ms"])


class RetryAfterClient:
    """A client that honours Retry-After: once refused, it holds every request due before the
    wait is over (recorded as WITHHELD; a closed-loop client, ``wait=True``, sleeps instead)
    and marks the first one it sends afterwards."""

    def __init__(self, target: HttpTarget, wait: bool = False) -> None:
        self.target = target
        self.wait = wait
        self.hold_until = 0.0
        self.waited = False

    async def send(self, s: Sample) -> None:
        if (left := self.hold_until - clock()) > 0:
            if not self.wait:
                s.status = WITHHELD
                return
            await asyncio.sleep(left)
        if self.waited:
            s.after_wait, self.waited = True, False
        await self.target.send(s)
        if s.status == 429 and s.retry_after is not None:
            self.hold_until = max(self.hold_until, clock() + s.retry_after)
            self.waited = True


def _error_code(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return "unparsable_error_body"
    err = doc.get("error") if isinstance(doc, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return str(code) if code else "no_error_code"


def _usage(doc: Any) -> tuple[int, int] | None:
    u = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(u, dict):
        return None
    return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
