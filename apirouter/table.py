"""The routing table: the immutable snapshot workers route from, and its byte codec.

The supervisor compiles a RouterConfig (plus live backend health and operator overrides) into
a RoutingTable, encodes it (orjson) and publishes the bytes in shared memory; each worker
decodes it once per generation. Everything a worker needs to decide is here, pre-digested
(URLs split, cumulative weights summed, fallback chains expanded), so the per-request path does
lookups, not parsing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any
from urllib.parse import urlsplit

import orjson

from apirouter.budgets import Budget, Price
from apirouter.config import RouterConfig
from apirouter.keys import KeyRecord, Tier

CODEC_VERSION = 3

# Backend states, as health checking and operators set them.
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"  # failed active probes
EJECTED = "ejected"  # outlier detection: too many failed requests in a row
DEGRADED = "degraded"  # operator: use only when nothing better is left
DRAINING = "draining"  # operator: send it nothing new
ROUTABLE_FIRST = frozenset({HEALTHY})


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
    index: int  # this backend's slot in the stats segment, stable across reloads
    health_path: str
    first_event_timeout_s: float | None = None  # streams; None: Limits' default
    idle_timeout_s: float | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.base_path}"


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    backend_ids: tuple[str, ...]
    weights: tuple[int, ...]
    strategy: str = "weighted"
    fallbacks: tuple[str, ...] = ()  # the whole chain, depth first, no repeats
    pinned: str | None = None  # operator override: always try this backend first
    limits: Tier | None = None  # per key on this model
    price: Price | None = None
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
    max_attempts: int
    redis_url: str = ""
    redis_timeout_ms: float = 500.0
    redis_failure_policy: str = "open"
    default_completion_tokens: int = 256
    workers: int = 1
    stream_first_event_timeout_s: float = 30.0
    stream_idle_timeout_s: float = 30.0
    client_eof_policy: str = "cancel"


@dataclass(frozen=True, slots=True)
class RoutingTable:
    compiled_at: float
    source: str
    limits: Limits
    backends: dict[str, Backend]
    routes: dict[str, Route]
    # Backend id -> state; a backend missing here is healthy.
    health: dict[str, str] = field(default_factory=dict)
    admin_token_sha256: str = ""  # hex SHA-256 of the admin bearer token; "" = admin disabled
    auth_required: bool = False
    keys: dict[str, KeyRecord] = field(default_factory=dict)  # by the key's SHA-256
    orgs: dict[str, Tier] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)  # by scope
    # Control-plane state for readiness reporting (config store, ...): JSON-able, not routing.
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return sorted(self.routes)

    def state(self, backend_id: str) -> str:
        return self.health.get(backend_id, HEALTHY)


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's change to routing, applied when the table is compiled."""

    kind: str  # "pin" (model -> backend), "weights" (model -> {backend: w}), "drain", "degrade"
    target: str  # a model (pin, weights) or a backend (drain, degrade)
    backend: str | None = None
    weights: dict[str, int] | None = None
    expires_at: float | None = None


def _split_url(url: str) -> tuple[str, str, int, str]:
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme, p.hostname or "", port, p.path.rstrip("/")


def _chain(model: str, fallbacks: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Depth-first expansion of a model's fallbacks; config validation forbids cycles."""
    out: list[str] = []

    def walk(name: str) -> None:
        for f in fallbacks.get(name, ()):
            if f != model and f not in out:
                out.append(f)
                walk(f)

    walk(model)
    return tuple(out)


def compile_table(cfg: RouterConfig, *, source: str, now: float | None = None,
                  status: dict[str, Any] | None = None,
                  health: Mapping[str, str] | None = None,
                  indices: Mapping[str, int] | None = None,
                  overrides: tuple[Override, ...] = ()) -> RoutingTable:
    now = time.time() if now is None else now
    backends = {}
    for i, b in enumerate(cfg.backends):
        scheme, host, port, base = _split_url(b.url)
        index = indices[b.id] if indices is not None else i
        backends[b.id] = Backend(b.id, scheme, host, port, base, b.timeout_s, index,
                                 b.health_path, b.first_event_timeout_s, b.idle_timeout_s)
    states = {bid: s for bid, s in (health or {}).items() if bid in backends}
    pins: dict[str, str] = {}
    weights: dict[str, dict[str, int]] = {}
    for o in overrides:
        if o.expires_at is not None and o.expires_at <= now:
            continue
        if o.kind == "drain" and o.target in backends:
            states[o.target] = DRAINING
        elif o.kind == "degrade" and o.target in backends and states.get(o.target) != DRAINING:
            states[o.target] = DEGRADED
        elif o.kind == "pin" and o.backend in backends:
            pins[o.target] = o.backend
        elif o.kind == "weights" and o.weights:
            weights[o.target] = o.weights
    fallbacks = {m.name: m.fallbacks for m in cfg.models}
    routes = {}
    for m in cfg.models:
        ids = tuple(t.backend for t in m.targets)
        ws = tuple(weights.get(m.name, {}).get(t.backend, t.weight) for t in m.targets)
        routes[m.name] = Route(m.name, ids, ws, m.strategy, _chain(m.name, fallbacks),
                               pins.get(m.name), m.limits, m.price)
    s = cfg.server
    limits = Limits(s.max_body_bytes, s.request_timeout_s, s.connect_timeout_s,
                    s.max_connections_per_backend, s.client_timeout_s, s.max_attempts,
                    s.redis_url, s.redis_timeout_ms, s.redis_failure_policy,
                    s.default_completion_tokens, s.workers, s.stream_first_event_timeout_s,
                    s.stream_idle_timeout_s, s.client_eof_policy)
    return RoutingTable(now, source, limits, backends, routes,
                        {k: v for k, v in states.items() if v != HEALTHY},
                        s.admin_token_sha256, s.auth_required,
                        {k.sha256: k for k in cfg.keys}, dict(cfg.orgs),
                        {b.scope: b for b in cfg.budgets}, status or {})


def _tier(t: Tier | None) -> list[int] | None:
    return None if t is None else [t.rpm, t.rpm_burst, t.tpm, t.tpm_burst]


def _untier(v: list[int] | None) -> Tier | None:
    return None if v is None else Tier(*v)


def encode_table(t: RoutingTable) -> bytes:
    lim = t.limits
    return orjson.dumps({
        "v": CODEC_VERSION,
        "compiled_at": t.compiled_at,
        "source": t.source,
        "limits": [lim.max_body_bytes, lim.request_timeout_s, lim.connect_timeout_s,
                   lim.max_connections_per_backend, lim.client_timeout_s, lim.max_attempts,
                   lim.redis_url, lim.redis_timeout_ms, lim.redis_failure_policy,
                   lim.default_completion_tokens, lim.workers, lim.stream_first_event_timeout_s,
                   lim.stream_idle_timeout_s, lim.client_eof_policy],
        "backends": [[b.id, b.scheme, b.host, b.port, b.base_path, b.timeout_s, b.index,
                      b.health_path, b.first_event_timeout_s, b.idle_timeout_s]
                     for b in t.backends.values()],
        "routes": [[r.model, list(r.backend_ids), list(r.weights), r.strategy,
                    list(r.fallbacks), r.pinned, _tier(r.limits),
                    None if r.price is None else [r.price.prompt_per_1k,
                                                  r.price.completion_per_1k]]
                   for r in t.routes.values()],
        "orgs": {o: _tier(v) for o, v in t.orgs.items()},
        "budgets": [[b.scope, b.period, b.spend_micro, b.tokens, b.requests]
                    for b in t.budgets.values()],
        "health": t.health,
        "admin": t.admin_token_sha256,
        "auth": t.auth_required,
        "keys": [[k.key_id, k.to_doc()] for k in t.keys.values()],
        "status": t.status,
    })


def _seconds(v: Any) -> float | None:
    return None if v is None else float(v)


def decode_table(data: bytes | memoryview) -> RoutingTable:
    try:
        d: Any = orjson.loads(data)
        if d.get("v") != CODEC_VERSION:
            raise TableDecodeError(f"codec version {d.get('v')!r}, expected {CODEC_VERSION}")
        mb, rt, ct, mc, cl, ma, ru, rto, rp, dct, wk, sft, sit, ceof = d["limits"]
        keys = {doc["sha256"]: KeyRecord.from_doc(key_id, doc) for key_id, doc in d["keys"]}
        backends = {
            bid: Backend(bid, scheme, host, int(port), base, _seconds(to), int(index), hp,
                         _seconds(ft), _seconds(it))
            for bid, scheme, host, port, base, to, index, hp, ft, it in d["backends"]
        }
        routes = {m: Route(m, tuple(ids), tuple(ws), strategy, tuple(fb), pinned, _untier(lim),
                           None if price is None else Price(*price))
                  for m, ids, ws, strategy, fb, pinned, lim, price in d["routes"]}
        return RoutingTable(float(d["compiled_at"]), d["source"],
                            Limits(int(mb), float(rt), float(ct), int(mc), float(cl), int(ma),
                                   str(ru), float(rto), str(rp), int(dct), int(wk), float(sft),
                                   float(sit), str(ceof)),
                            backends, routes, dict(d.get("health") or {}), str(d["admin"]),
                            bool(d["auth"]), keys,
                            {o: Tier(*v) for o, v in d["orgs"].items()},
                            {b[0]: Budget(*b) for b in d["budgets"]},
                            dict(d.get("status") or {}))
    except TableDecodeError:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise TableDecodeError(f"malformed table: {e}") from None


def describe(t: RoutingTable) -> dict[str, Any]:
    """A readable form of a table, for operators (apirouterctl dump-table, the admin API)."""
    return {
        "source": t.source,
        "compiled_at": t.compiled_at,
        "limits": {k: getattr(t.limits, k) for k in t.limits.__slots__},
        "backends": {b.id: {"url": b.url, "timeout_s": b.timeout_s, "state": t.state(b.id),
                            "first_event_timeout_s": b.first_event_timeout_s,
                            "idle_timeout_s": b.idle_timeout_s,
                            "health_path": b.health_path} for b in t.backends.values()},
        "models": {r.model: {"strategy": r.strategy, "fallbacks": list(r.fallbacks),
                             "pinned": r.pinned,
                             "backends": [{"backend": b, "weight": w} for b, w in
                                          zip(r.backend_ids, r.weights, strict=True)]}
                   for r in t.routes.values()},
        "status": t.status,
    }
