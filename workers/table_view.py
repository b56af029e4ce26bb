"""A worker's view of the published routing table, swapped when the generation moves.

Per request the worker reads one 8-byte generation from shared memory; only when it changed is
the new snapshot decoded and a new TableView built (pre-rendered request heads, the pool for
each backend, the /v1/models body). Pools are keyed by address, so they survive reloads that
do not move a backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import orjson

from apirouter.shm import SegmentError, TableReader
from apirouter.table import Backend, RoutingTable, TableDecodeError, decode_table
from workers.metrics import TABLE_GENERATION, preregister
from workers.upstream import BackendPool

log = logging.getLogger("apirouter.worker")


@dataclass(frozen=True, slots=True)
class BackendTarget:
    backend: Backend
    pool: BackendPool
    timeout_s: float
    first_event_s: float  # streams: deadline for the status and first event
    idle_s: float  # streams: longest silence between events
    # Request line and fixed headers of POST {base}{path}, rendered on first use per path.
    heads: dict[str, bytes] = field(default_factory=dict)

    def head(self, path: str) -> bytes:
        got = self.heads.get(path)
        if got is None:
            got = self.heads[path] = _post_head(self.backend, path)
        return got


@dataclass(frozen=True, slots=True)
class TableView:
    generation: int
    table: RoutingTable
    targets: dict[str, BackendTarget]
    models_body: bytes
    loaded_at: float


def _post_head(b: Backend, path: str) -> bytes:
    default_port = 443 if b.scheme == "https" else 80
    host = b.host if b.port == default_port else f"{b.host}:{b.port}"
    return (f"POST {b.base_path}{path} HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\n").encode("latin-1")


class TableCache:
    """Owns the segment reader, the current view and the upstream pools of one worker."""

    def __init__(self, reader: TableReader) -> None:
        self._reader = reader
        self._pools: dict[tuple[str, str, int], BackendPool] = {}
        self._view: TableView | None = None
        self._generation = -1
        self.reload_errors = 0

    def current(self) -> TableView:
        """The view for the published generation; cheap unless the table just changed."""
        # An odd generation is a publish in progress (or a writer that died in it): the last
        # complete one, g - 1, is what stays in force.
        if (self._reader.generation() & ~1) != self._generation:
            self._refresh()
        assert self._view is not None
        return self._view

    def _refresh(self) -> None:
        try:
            gen, payload = self._reader.read()
            table = decode_table(payload)
        except (SegmentError, TableDecodeError) as e:
            # Keep serving the last good view; the next request tries again.
            self.reload_errors += 1
            log.error("cannot load routing table: %s", e)
            if self._view is None:
                raise
            return
        self._view = self._build(gen, table)
        self._generation = gen
        TABLE_GENERATION.set(gen)
        preregister(table)

    def _build(self, gen: int, table: RoutingTable) -> TableView:
        limits = table.limits
        wanted: dict[tuple[str, str, int], BackendPool] = {}
        targets = {}
        for b in table.backends.values():
            key = (b.scheme, b.host, b.port)
            pool = self._pools.get(key) or wanted.get(key)
            if pool is None or pool.max_connections != limits.max_connections_per_backend:
                pool = BackendPool(b.scheme, b.host, b.port, limits.max_connections_per_backend,
                                   limits.connect_timeout_s)
            wanted[key] = pool
            pool.connect_timeout = limits.connect_timeout_s
            timeout = min(b.timeout_s or limits.request_timeout_s, limits.request_timeout_s)
            targets[b.id] = BackendTarget(
                b, pool, timeout, b.first_event_timeout_s or limits.stream_first_event_timeout_s,
                b.idle_timeout_s or limits.stream_idle_timeout_s)
        for key, pool in self._pools.items():
            if wanted.get(key) is not pool:
                pool.close()
        self._pools = wanted
        created = int(table.compiled_at)
        models_body = orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "apirouter"}
            for m in table.model_names]})
        return TableView(gen, table, targets, models_body, time.time())

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._reader.close()
