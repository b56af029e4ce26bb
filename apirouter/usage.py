"""The usage record: what the router accounts for each request, and how readers select from it.

The JSON Schema beside this module (usage_record.schema.json) is the contract; a test holds
``usage_record`` to it. Records are encoded once, in the worker, and travel as bytes from there
on (ring → supervisor → Kafka, spool, audit store) so every copy of a record is identical.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import msgspec
import orjson
from msgspec import UNSET, UnsetType

from apirouter._ringcore import record_encoder
from apirouter.errors import RouterError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("usage_record.schema.json")
MAX_FIELDS = 64


@cache
def schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


@cache
def field_names() -> frozenset[str]:
    return frozenset(schema()["properties"])


# The parts of a RecordSource that encode_record reads (read-only properties: any object with
# such attributes fits, the worker's dataclasses and usage_record's tuples alike).
class _Key(Protocol):
    @property
    def key_id(self) -> str | None: ...
    @property
    def org(self) -> str | None: ...


class _Caller(Protocol):
    @property
    def key(self) -> _Key: ...


class _Endpoint(Protocol):
    @property
    def path(self) -> str: ...


class _Attempt(Protocol):
    @property
    def backend_id(self) -> str | None: ...
    @property
    def decision_type(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...
    @property
    def backend_s(self) -> float: ...


class _View(Protocol):
    @property
    def generation(self) -> int: ...


class RecordSource(Protocol):
    """What a record is read from: the worker's request context (workers.context), read
    where it lies rather than passed field by field (see ``encode_record``)."""

    @property
    def request_id(self) -> str: ...
    @property
    def t0(self) -> float: ...
    @property
    def endpoint(self) -> _Endpoint: ...
    @property
    def caller(self) -> _Caller | None: ...
    @property
    def fwd(self) -> _Attempt | None: ...
    @property
    def view(self) -> _View: ...
    @property
    def ttft_s(self) -> float | None: ...
    @property
    def events(self) -> int: ...
    @property
    def interruption(self) -> str | None: ...
    @property
    def cost_micro(self) -> int: ...
    @property
    def usage_estimated(self) -> bool: ...


# usage_record's fields as a RecordSource's parts.
class _Path(NamedTuple):
    path: str


class _KeyFields(NamedTuple):
    key_id: str | None
    org: str | None


class _Holder(NamedTuple):
    key: _KeyFields


class _Attempted(NamedTuple):
    backend_id: str | None
    decision_type: str | None
    attempts: int
    backend_s: float


class _Generation(NamedTuple):
    generation: int


class _Fields(NamedTuple):
    """``usage_record``'s flat fields as a RecordSource (the nested parts are small tuples)."""

    request_id: str
    t0: float
    endpoint: _Path
    caller: _Holder
    fwd: _Attempted
    view: _Generation
    ttft_s: float | None
    events: int
    interruption: str | None
    cost_micro: int
    usage_estimated: bool


def usage_record(*, kind: str, request_id: str, ts_start: float, ts_end: float, endpoint: str,
                 key_id: str | None, org: str | None, model: str, backend_id: str | None,
                 decision_type: str | None, attempts: int, status: int,
                 error_code: str | None, prompt_tokens: int | None,
                 completion_tokens: int | None, cost_micro: int, backend_s: float,
                 table_generation: int, worker_pid: int, limit: str | None = None,
                 retry_after_s: int | None = None, stream: bool = False,
                 ttft_s: float | None = None, events: int = 0,
                 interruption: str | None = None, usage_estimated: bool = False) -> bytes:
    """A record from its fields one by one (tests, benchmarks, tools): ``encode_record`` of
    them, so every record is built in one place."""
    source = _Fields(request_id, ts_start, _Path(endpoint), _Holder(_KeyFields(key_id, org)),
                     _Attempted(backend_id, decision_type, attempts, backend_s),
                     _Generation(table_generation), ttft_s, events, interruption, cost_micro,
                     usage_estimated)
    return encode_record(kind, source, model, ts_end, status, error_code,
                         (prompt_tokens, completion_tokens), worker_pid, stream, limit,
                         retry_after_s)


class _Record(msgspec.Struct, omit_defaults=True):
    """A record's fields in the order they are written. The trailing ones are written only
    when set (UNSET is omitted; None is written as null)."""

    schema_version: int
    kind: str
    request_id: str
    ts_start: float
    ts_end: float
    endpoint: str
    key_id: str | None
    org: str | None
    model: str
    backend_id: str | None
    decision_type: str | None
    attempts: int
    status: int
    error_code: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cost_micro: int
    router_overhead_ms: float
    backend_latency_ms: float
    total_latency_ms: float
    table_generation: int
    worker_pid: int
    stream: bool | UnsetType = UNSET
    ttft_ms: float | None | UnsetType = UNSET
    events: int | UnsetType = UNSET
    interruption: str | None | UnsetType = UNSET
    usage_estimated: bool | UnsetType = UNSET
    limit: str | UnsetType = UNSET
    retry_after_s: int | UnsetType = UNSET


_encode = msgspec.json.Encoder().encode


def _encode_record_py(kind: str, source: RecordSource, model: str, ts_end: float,
                      status: int, error_code: str | None,
                      used: tuple[int | None, int | None] | None, worker_pid: int, stream: bool,
                      limit: str | None = None, retry_after_s: int | None = None) -> bytes:
    """The one builder of records (``encode_record`` is its C form, below). ``source`` gives
    the request's id, start, endpoint, caller (None: no key), last attempt (None: never
    forwarded), cost and whether its usage was estimated (both read only when ``used`` is
    given), and stream figures (read only when ``stream``); ``used`` is the (prompt,
    completion) tokens, None when none count.

    The worker's accounting step calls it for every request with its RequestContext as the
    source: reading the fields here, where they are used, saved the ~26 arguments the context's
    fields were passed as, and the call between (~90 bytecodes a request). Encoded from a
    msgspec Struct, not a dict through orjson: the same bytes (a test holds them equal) for
    ~0.4 µs less a record (1.7 -> 1.3 µs on the loaded VM; test_micro's
    test_usage_record_encode)."""
    ts_start = source.t0
    # Latencies in ms with µs resolution: int() truncation is ~10x cheaper than round().
    total_us = int((ts_end - ts_start) * 1e6)
    fwd = source.fwd
    if fwd is None:
        backend_id = decision_type = None
        attempts = backend_us = 0
    else:
        backend_id, decision_type, attempts = fwd.backend_id, fwd.decision_type, fwd.attempts
        backend_us = int(fwd.backend_s * 1e6)
    # Wall-clock total and monotonic backend time can disagree by a hair: total covers backend.
    if total_us < backend_us:
        total_us = backend_us
    caller = source.caller
    if caller is None:
        key_id = org = None
    else:
        key = caller.key
        key_id, org = key.key_id, key.org
    if used is None:
        prompt_tokens = completion_tokens = total_tokens = None
        cost_micro = 0
    else:
        prompt_tokens, completion_tokens = used
        total_tokens = prompt_tokens + completion_tokens \
            if prompt_tokens is not None and completion_tokens is not None else None
        cost_micro = source.cost_micro
    record = _Record(
        SCHEMA_VERSION, kind, source.request_id, ts_start, ts_end, source.endpoint.path, key_id,
        org, model, backend_id, decision_type, attempts, status, error_code, prompt_tokens,
        completion_tokens, total_tokens, cost_micro, (total_us - backend_us) / 1000,
        backend_us / 1000, total_us / 1000, source.view.generation, worker_pid)
    if stream:
        ttft_s = source.ttft_s
        record.stream = True
        record.ttft_ms = None if ttft_s is None else int(ttft_s * 1e6) / 1000
        record.events = source.events
        record.interruption = source.interruption
    if used is not None and source.usage_estimated:
        record.usage_estimated = True
    if limit is not None:
        record.limit = limit
    if retry_after_s is not None:
        record.retry_after_s = retry_after_s
    return _encode(record)


# The builder in C (apirouter/_ringcore.c): the same bytes from one call, reading the source's
# fields where they lie; any value it does not write itself (an escaped or non-ASCII string, a
# float msgspec writes with an exponent, an int subclass, ...) it hands, with the same
# arguments, to ``_encode_record_py``, the reference a property test holds it equal to
# (tests/apirouter/test_usage_record.py). ~1.07 µs a record against the reference's ~1.5-2.0,
# and ~119 bytecodes less a request in the worker.
encode_record = record_encoder(_encode_record_py, _encode)


class UsageItem(NamedTuple):
    """An encoded record and the fields its destinations index it by."""

    raw: bytes
    request_id: str
    org: str | None
    ts_end: float


def read_item(raw: bytes) -> UsageItem | None:
    """The index fields of an encoded record; None if it is not a usage record at all."""
    try:
        doc = orjson.loads(raw)
        return UsageItem(raw, str(doc["request_id"]), doc.get("org"), float(doc["ts_end"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _index_decoder() -> Callable[[bytes], Any] | None:
    """msgspec's decoder of the three index fields; None in a virtualenv made before msgspec
    was a dependency (tools/setup.sh installs it), where read_items reads as read_item."""
    try:
        import msgspec
    except ImportError:
        return None

    class Index(msgspec.Struct):
        request_id: str
        ts_end: float
        org: str | None = None

    return msgspec.json.Decoder(Index).decode


_decode_index = _index_decoder()


def read_items(raws: list[bytes]) -> tuple[list[UsageItem], list[bytes]]:
    """``read_item`` over a batch: (the usage records, the entries that are not).

    Each record is decoded by a decoder that skips the fields nobody indexes (~0.7 µs a
    record where ``read_item``'s full parse costs ~2). It accepts a subset of what
    ``read_item`` does, with the same values (a differential test holds it to that); whatever
    it refuses — another type, deeper nesting, invalid UTF-8 (which it does not check in
    skipped strings, hence the check before it), not JSON at all — goes through ``read_item``,
    so the result never depends on the path taken."""
    decode = _decode_index or _refuse
    if all(map(bytes.isascii, raws)):
        # The usual batch: every record ASCII and taken by the decoder, built without a
        # Python call per record (NamedTuple's __new__ is one): ~0.07 µs a record less.
        try:
            return [_new_tuple(UsageItem, (raw, i.request_id, i.org, i.ts_end))
                    for raw, i in zip(raws, map(decode, raws), strict=True)], []
        except Exception:
            pass  # one of them refused: each record on its own, below
    items: list[UsageItem] = []
    bad: list[bytes] = []
    for raw in raws:
        try:
            if not raw.isascii():
                raw.decode()
            i = decode(raw)
        except Exception:  # any refusal (RecursionError included): the reference decides
            item = read_item(raw)
            if item is None:
                bad.append(raw)
            else:
                items.append(item)
            continue
        items.append(UsageItem(raw, i.request_id, i.org, i.ts_end))
    return items, bad


_new_tuple = tuple.__new__


def _refuse(raw: bytes) -> Any:
    raise ValueError("no index decoder")


def parse_fields(raw: str | None) -> tuple[str, ...] | None:
    """``?fields=a,b`` → the names, checked against the schema; None selects everything."""
    if raw is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names:
        raise RouterError("INVALID_REQUEST", "fields: give a comma-separated list of field "
                                             "names, or leave the parameter out")
    if len(names) > MAX_FIELDS:
        raise RouterError("INVALID_REQUEST", f"fields: at most {MAX_FIELDS} names")
    known = field_names()
    for n in names:
        if n not in known:
            shown = n if len(n) <= 64 else n[:64] + "…"
            raise RouterError("INVALID_REQUEST", f"fields: unknown field {shown!r}; known: "
                                                 f"{', '.join(sorted(known))}")
    return names


def select(record: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    if fields is None:
        return record
    return {n: record[n] for n in fields if n in record}
