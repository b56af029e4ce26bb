"""The routing table: the immutable snapshot workers route from, and its byte codec.

The supervisor compiles a RouterConfig into a RoutingTable, encodes it (orjson) and publishes
the bytes in shared memory; each worker decodes it once per generation. Everything a worker
needs to decide is here, pre-digested (URLs split, cumulative weights summed), so the
per-request path does lookups, not parsing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any
from urllib.parse import urlsplit

import orjson

from apirouter.config import RouterConfig

CODEC_VERSION = 1


class TableDecodeError(ValueError):
    """The bytes are not a routing table this code understands."""


@dataclass(frozen=True, slots=True)
class Backend:
    id: str
    scheme: str
    host: str
    port: int
    base_path: str
    timeout_s: float | None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    backend_ids: tuple[str, ...]
    weights: tuple[int, ...]
    # Derived once at decode so a weighted pick is one bisect.
    cumulative: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cumulative", tuple(accumulate(self.weights)))


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int
    request_timeout_s: float
    connect_timeout_s: float
    max_connections_per_backend: int
    client_timeout_s: float


@dataclass(frozen=True, slots=True)
class RoutingTable:
    compiled_at: float
    source: str
    limits: Limits
    backends: dict[str, Backend]
    routes: dict[str, Route]
    # Control-plane state for readiness reporting (config store, ...): JSON-able, not routing.
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return sorted(self.routes)


def _split_url(url: str) -> tuple[str, str, int, str]:
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme, p.hostname or "", port, p.path.rstrip("/")


def compile_table(cfg: RouterConfig, *, source: str, now: float | None = None,
                  status: dict[str, Any] | None = None) -> RoutingTable:
    backends = {}
    for b in cfg.backends:
        scheme, host, port, base = _split_url(b.url)
        backends[b.id] = Backend(b.id, scheme, host, port, base, b.timeout_s)
    routes = {
        m.name: Route(m.name, tuple(t.backend for t in m.targets),
                      tuple(t.weight for t in m.targets))
        for m in cfg.models
    }
    s = cfg.server
    limits = Limits(s.max_body_bytes, s.request_timeout_s, s.connect_timeout_s,
                    s.max_connections_per_backend, s.client_timeout_s)
    return RoutingTable(time.time() if now is None else now, source, limits, backends, routes,
                        status or {})


def encode_table(t: RoutingTable) -> bytes:
    return orjson.dumps({
        "v": CODEC_VERSION,
        "compiled_at": t.compiled_at,
        "source": t.source,
        "limits": [t.limits.max_body_bytes, t.limits.request_timeout_s,
                   t.limits.connect_timeout_s, t.limits.max_connections_per_backend,
                   t.limits.client_timeout_s],
        "backends": [[b.id, b.scheme, b.host, b.port, b.base_path, b.timeout_s]
                     for b in t.backends.values()],
        "routes": [[r.model, list(r.backend_ids), list(r.weights)] for r in t.routes.values()],
        "status": t.status,
    })


def decode_table(data: bytes | memoryview) -> RoutingTable:
    try:
        d: Any = orjson.loads(data)
        if d.get("v") != CODEC_VERSION:
            raise TableDecodeError(f"codec version {d.get('v')!r}, expected {CODEC_VERSION}")
        mb, rt, ct, mc, cl = d["limits"]
        backends = {
            bid: Backend(bid, scheme, host, int(port), base, None if to is None else float(to))
            for bid, scheme, host, port, base, to in d["backends"]
        }
        routes = {m: Route(m, tuple(ids), tuple(ws)) for m, ids, ws in d["routes"]}
        return RoutingTable(float(d["compiled_at"]), d["source"],
                            Limits(int(mb), float(rt), float(ct), int(mc), float(cl)),
                            backends, routes, dict(d.get("status") or {}))
    except TableDecodeError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise TableDecodeError(f"malformed table: {e}") from None
