"""The config model: what an operator writes (YAML), validated into frozen objects.

A config has three sections::

    server:            # process and request settings (see SETTINGS)
      workers: 2
    backends:          # where requests can go
      mock-a: {url: "http://127.0.0.1:9001"}
    models:            # which backends serve a model name, and with what weight
      gpt-4o-mini:
        backends:
          - {backend: mock-a, weight: 3}

Every setting is declared once in SETTINGS (name, type, default, env var, check, doc);
``APIROUTER_<NAME>`` environment variables override the file, and command-line flags
override both. Errors name the offending path, e.g. ``models.gpt-4o.backends[1].weight``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml


class ConfigError(ValueError):
    """The config is not valid; the message names the path of the problem."""


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    type: type
    default: Any
    doc: str
    check: Callable[[Any], bool] = lambda v: True
    check_doc: str = ""

    @property
    def env(self) -> str:
        return f"APIROUTER_{self.name.upper()}"

    @property
    def parse(self) -> Callable[[str], Any]:
        """How a command-line value becomes this setting's type (argparse ``type=``)."""
        return boolean if self.type is bool else self.type


LOG_LEVEL_ENV = "APIROUTER_LOG_LEVEL"  # the supervisor's --log-level, handed to the workers
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def boolean(text: str) -> bool:
    """A boolean as people write it on a command line or in an environment variable;
    anything else is refused (argparse reports "invalid boolean value")."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")


def _positive(v: Any) -> bool:
    return bool(v > 0)


SETTINGS: tuple[Setting, ...] = (
    Setting("bind", str, "127.0.0.1:8080", "HOST:PORT the workers listen on",
            lambda v: ":" in v, "must be HOST:PORT"),
    Setting("workers", int, 2, "number of worker processes", _positive, "must be > 0"),
    Setting("max_body_bytes", int, 1_048_576, "largest request body accepted",
            _positive, "must be > 0"),
    Setting("request_timeout_s", float, 60.0, "deadline for one request, backend included",
            _positive, "must be > 0"),
    Setting("connect_timeout_s", float, 2.0, "deadline to open a backend connection",
            _positive, "must be > 0"),
    Setting("stream_first_event_timeout_s", float, 30.0,
            "streams: deadline for a backend's status and first event (time to first token); "
            "until then a stream can still fail over (per backend: first_event_timeout_s)",
            _positive, "must be > 0"),
    Setting("stream_idle_timeout_s", float, 30.0,
            "streams: longest silence between two events before a stream counts as stalled "
            "(per backend: idle_timeout_s)", _positive, "must be > 0"),
    Setting("max_connections_per_backend", int, 256,
            "keep-alive connections one worker may hold to one backend", _positive, "must be > 0"),
    Setting("keepalive_s", float, 75.0,
            "how long an idle client connection is kept open (takes effect on restart)",
            _positive, "must be > 0"),
    Setting("client_timeout_s", float, 30.0,
            "how long a client may take to send one complete request, or leave a response "
            "unread with its socket full (then it is disconnected)", _positive, "must be > 0"),
    Setting("client_eof_policy", str, "cancel",
            "a client's EOF before its answer: cancel (it hung up: the request is cancelled and "
            "recorded as 499, as nginx does) or answer (it half-closed: what it sent completely "
            "is answered, then the connection closes; a client that really closed is then "
            "noticed only when its answer is written)",
            lambda v: v in ("cancel", "answer"), "must be cancel or answer"),
    Setting("graceful_timeout_s", float, 30.0, "how long a drain waits for in-flight requests",
            _positive, "must be > 0"),
    Setting("max_attempts", int, 3, "backends one request may try (failover included)",
            _positive, "must be > 0"),
    Setting("health_interval_s", float, 2.0, "active health probe interval per backend",
            _positive, "must be > 0"),
    Setting("health_timeout_s", float, 1.0, "deadline of one health probe", _positive,
            "must be > 0"),
    Setting("healthy_threshold", int, 2, "consecutive good probes that restore a backend",
            _positive, "must be > 0"),
    Setting("unhealthy_threshold", int, 3, "consecutive failed probes that mark it unhealthy",
            _positive, "must be > 0"),
    Setting("outlier_consecutive_failures", int, 5,
            "consecutive request failures (all workers) that eject a backend", _positive,
            "must be > 0"),
    Setting("outlier_base_ejection_s", float, 5.0,
            "first ejection time; doubles on each repeat ejection", _positive, "must be > 0"),
    Setting("outlier_max_ejection_s", float, 300.0, "longest ejection", _positive,
            "must be > 0"),
    Setting("outlier_max_ejected_percent", int, 50,
            "never eject more than this share of the backends", lambda v: 0 <= v <= 100,
            "must be 0..100"),
    Setting("redis_url", str, "",
            "Redis for admission (redis://host:port/db); empty: the in-process limiter"),
    Setting("redis_timeout_ms", float, 500.0,
            "Redis counts as down when it sends nothing back for this long while replies are "
            "owed (then the failure policy decides); a late reply before that is honoured",
            _positive, "must be > 0"),
    Setting("redis_failure_policy", str, "open",
            "when Redis fails: open (admit) or closed (refuse with 503)",
            lambda v: v in ("open", "closed"), "must be open or closed"),
    Setting("default_completion_tokens", int, 256,
            "tokens reserved for a completion when a request sets no max_tokens", _positive,
            "must be > 0"),
    Setting("auth_required", bool, True,
            "require an API key on inference and admin endpoints (off: open access)"),
    Setting("admin_token_sha256", str, "",
            "hex SHA-256 of a break-glass admin bearer token (empty: no such token; "
            "admin-scoped API keys still reach the admin API)",
            lambda v: v == "" or (len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
            "must be 64 lowercase hex digits"),
    Setting("table_slot_bytes", int, 4 * 1024 * 1024,
            "capacity of one routing-table slot in shared memory", lambda v: v >= 4096,
            "must be >= 4096"),
    Setting("kafka_bootstrap", str, "",
            "Kafka bootstrap servers for usage records, HOST:PORT[,HOST:PORT] (empty: JSONL "
            "files in the spool directory; restart to change)"),
    Setting("kafka_topic", str, "apirouter.usage", "topic usage records are published to",
            lambda v: 0 < len(v) <= 249, "must be 1-249 chars"),
    Setting("kafka_idempotence", bool, True,
            "idempotent producer (turn off only for brokers without InitProducerId)"),
    Setting("kafka_compression", str, "gzip", "batch compression: none, gzip, snappy, lz4, zstd",
            lambda v: v in ("none", "gzip", "snappy", "lz4", "zstd"),
            "must be none, gzip, snappy, lz4 or zstd"),
    Setting("kafka_timeout_s", float, 5.0,
            "a batch Kafka has not acknowledged by then goes to the disk spool", _positive,
            "must be > 0"),
    Setting("spool_dir", str, "",
            "usage spool and local audit store (empty: RUN_DIR/spool; restart to change)"),
    Setting("usage_ring_bytes", int, 1024 * 1024,
            "per-worker usage ring in shared memory (restart to change)",
            lambda v: 65536 <= v <= 1 << 30, "must be 64 KiB .. 1 GiB"),
    Setting("audit_ttl_s", int, 86400, "how long a request's audit record can be looked up",
            _positive, "must be > 0"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Field types only: names, defaults and checks live in SETTINGS."""

    bind: str
    workers: int
    max_body_bytes: int
    request_timeout_s: float
    connect_timeout_s: float
    stream_first_event_timeout_s: float
    stream_idle_timeout_s: float
    max_connections_per_backend: int
    keepalive_s: float
    client_timeout_s: float
    client_eof_policy: str
    graceful_timeout_s: float
    max_attempts: int
    health_interval_s: float
    health_timeout_s: float
    healthy_threshold: int
    unhealthy_threshold: int
    outlier_consecutive_failures: int
    outlier_base_ejection_s: float
    outlier_max_ejection_s: float
    outlier_max_ejected_percent: int
    redis_url: str
    redis_timeout_ms: float
    redis_failure_policy: str
    default_completion_tokens: int
    auth_required: bool
    admin_token_sha256: str
    table_slot_bytes: int
    kafka_bootstrap: str
    kafka_topic: str
    kafka_idempotence: bool
    kafka_compression: str
    kafka_timeout_s: float
    spool_dir: str
    usage_ring_bytes: int
    audit_ttl_s: int

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ServerConfig:
        return cls(**{s.name: values.get(s.name, s.default) for s in SETTINGS})


@dataclass(frozen=True, slots=True)
class BackendConfig:
    id: str
    url: str
    timeout_s: float | None = None
    health_path: str = "/health"  # "" disables active probing
    first_event_timeout_s: float | None = None  # streams; None: the server's setting
    idle_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class TargetConfig:
    backend: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    targets: tuple[TargetConfig, ...]
    strategy: str = "weighted"
    fallbacks: tuple[str, ...] = ()
    limits: Any = None  # keys.Tier applied per key per model, or None
    price: Any = None  # budgets.Price, or None (free)


STRATEGIES = ("weighted", "least_inflight", "latency")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    server: ServerConfig = field(default_factory=lambda: ServerConfig.from_values({}))
    backends: tuple[BackendConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    tiers: dict[str, Any] = field(default_factory=dict)  # name -> keys.Tier
    keys: tuple[Any, ...] = ()  # keys.KeyRecord
    orgs: dict[str, Any] = field(default_factory=dict)  # org -> keys.Tier
    budgets: tuple[Any, ...] = ()  # budgets.Budget


def _coerce(setting: Setting, raw: Any, where: str) -> Any:
    try:
        if setting.type is bool and isinstance(raw, str):
            value: Any = boolean(raw)
        elif setting.type in (int, float) and isinstance(raw, bool):
            raise TypeError
        else:
            value = setting.type(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {setting.type.__name__}, got {raw!r}") from None
    if not setting.check(value):
        raise ConfigError(f"{where}: {setting.check_doc} (got {value!r})")
    return value


def _server(raw: Any, env: Mapping[str, str], overrides: Mapping[str, Any]) -> ServerConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("server: expected a mapping")
    unknown = set(raw) - set(SETTINGS_BY_NAME)
    if unknown:
        raise ConfigError(f"server.{sorted(unknown)[0]}: unknown setting")
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.name in overrides and overrides[s.name] is not None:
            values[s.name] = _coerce(s, overrides[s.name], f"--{s.name.replace('_', '-')}")
        elif s.env in env:
            values[s.name] = _coerce(s, env[s.env], s.env)
        elif s.name in raw:
            values[s.name] = _coerce(s, raw[s.name], f"server.{s.name}")
    return ServerConfig.from_values(values)


def _backend(bid: Any, raw: Any) -> BackendConfig:
    where = f"backends.{bid}"
    # ASCII only: an id goes into the X-Router-Backend response header (and metric labels);
    # str.isalnum alone also takes 東京.
    if not isinstance(bid, str) or not bid or len(bid) > 64 or not bid.isascii() or \
            not bid.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"{where}: backend ids are 1-64 chars of letters, digits, - _ .")
    if isinstance(raw, str):
        raw = {"url": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with a url")
    unknown = set(raw) - {"url", "timeout_s", "health_path", "first_event_timeout_s",
                          "idle_timeout_s"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    url = raw.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}.url: required, a http(s) URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: must be http://HOST[:PORT][/base] or https://…")
    try:
        _ = parts.port  # raises on a malformed port
    except ValueError:
        raise ConfigError(f"{where}.url: invalid port") from None
    timeout, first, idle = (_seconds(raw, name, where) for name in (
        "timeout_s", "first_event_timeout_s", "idle_timeout_s"))
    health_path = raw.get("health_path", "/health")
    if not isinstance(health_path, str) or (health_path and not health_path.startswith("/")):
        raise ConfigError(f"{where}.health_path: a path starting with /, or \"\" for no probes")
    return BackendConfig(bid, url.rstrip("/"), timeout, health_path, first, idle)


def _seconds(raw: dict[str, Any], name: str, where: str) -> float | None:
    v = raw.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
        raise ConfigError(f"{where}.{name}: must be a positive number")
    return None if v is None else float(v)


def _model(name: Any, raw: Any, backend_ids: set[str]) -> ModelConfig:
    where = f"models.{name}"
    if not isinstance(name, str) or not name or len(name) > 256:
        raise ConfigError(f"{where}: model names are non-empty strings up to 256 chars")
    if not isinstance(raw, dict) or not isinstance(raw.get("backends"), list) or not raw[
            "backends"]:
        raise ConfigError(f"{where}.backends: required, a non-empty list")
    unknown = set(raw) - {"backends", "strategy", "fallbacks", "limits", "price"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    strategy = raw.get("strategy", "weighted")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}.strategy: one of {', '.join(STRATEGIES)}")
    fallbacks = raw.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise ConfigError(f"{where}.fallbacks: a list of model names")
    targets = []
    seen: set[str] = set()
    for i, t in enumerate(raw["backends"]):
        tw = f"{where}.backends[{i}]"
        if isinstance(t, str):
            t = {"backend": t}
        if not isinstance(t, dict):
            raise ConfigError(f"{tw}: expected {{backend: ID, weight: N}}")
        bid = t.get("backend")
        if bid not in backend_ids:
            raise ConfigError(f"{tw}.backend: unknown backend {bid!r}")
        if bid in seen:
            raise ConfigError(f"{tw}.backend: {bid!r} listed twice")
        seen.add(bid)
        weight = t.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
            raise ConfigError(f"{tw}.weight: must be an integer from 0 to 1000000")
        targets.append(TargetConfig(bid, weight))
    if not any(t.weight for t in targets):
        raise ConfigError(f"{where}.backends: at least one weight must be > 0")
    limits = None
    if raw.get("limits") is not None:
        from apirouter.keys import parse_limits

        limits = parse_limits(raw["limits"], f"{where}.limits")
    price = None
    if raw.get("price") is not None:
        from apirouter.budgets import parse_price

        price = parse_price(raw["price"], f"{where}.price")
    return ModelConfig(name, tuple(targets), strategy, tuple(fallbacks), limits, price)


def _check_fallbacks(models: tuple[ModelConfig, ...]) -> None:
    """Fallbacks name known models and never lead back to where they started."""
    by_name = {m.name: m for m in models}
    for m in models:
        for f in m.fallbacks:
            if f not in by_name:
                raise ConfigError(f"models.{m.name}.fallbacks: unknown model {f!r}")

    def visit(name: str, path: list[str]) -> None:
        for f in by_name[name].fallbacks:
            if f in path:
                cycle = " -> ".join([*path[path.index(f):], f])
                raise ConfigError(f"models.{name}.fallbacks: cycle {cycle}")
            visit(f, [*path, f])

    for m in models:
        visit(m.name, [m.name])


def parse_config(raw: Any, *, env: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> RouterConfig:
    """Validate a decoded YAML document. Pure: the environment is passed in."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    unknown = set(raw) - {"server", "backends", "models", "tiers", "keys", "orgs", "budgets"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section")
    server = _server(raw.get("server"), env or {}, overrides or {})
    braw = raw.get("backends") or {}
    if not isinstance(braw, dict):
        raise ConfigError("backends: expected a mapping of id -> {url: ...}")
    backends = tuple(_backend(k, v) for k, v in braw.items())
    mraw = raw.get("models") or {}
    if not isinstance(mraw, dict):
        raise ConfigError("models: expected a mapping of model name -> {backends: [...]}")
    ids = {b.id for b in backends}
    models = tuple(_model(k, v, ids) for k, v in mraw.items())
    _check_fallbacks(models)
    from apirouter.keys import parse_keys, parse_orgs, parse_tiers  # keys builds on this module

    tiers = parse_tiers(raw.get("tiers"))
    from apirouter.budgets import parse_budgets

    return RouterConfig(server, backends, models, tiers, parse_keys(raw.get("keys"), tiers),
                        parse_orgs(raw.get("orgs")), parse_budgets(raw.get("budgets")))


def read_config_file(path: str) -> Any:
    """The decoded YAML document, or a ConfigError saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def load_config_file(path: str, *, overrides: Mapping[str, Any] | None = None) -> RouterConfig:
    return parse_config(read_config_file(path), env=os.environ, overrides=overrides)
