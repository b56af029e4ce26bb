"""Writes drained usage records to the audit store (Redis with a TTL, or local SQLite).

Records are keyed by (org, request id), and the first record of a key wins (SET NX / INSERT OR
IGNORE): a replayed duplicate is identical anyway, a client re-using an id cannot overwrite a
record already stored, and an id another org used first cannot hide an org's own record.

A Redis store is also PINGed when no write went through for PROBE_S, so readyz shows an
outage (and the recovery) without waiting for the next record.

The audit store is a lookup index; the durable copy of a record is the usage sink (Kafka or
the spool). So a store failure never holds records back: the batch is counted in
router_audit_store_errors_total, logged once per outage, and readyz shows ``audit_store``
degraded until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from apirouter.audit import (
    CREATE_TABLE,
    INDEX_NAME,
    INSERT,
    PURGE,
    hour_file,
    parse_store,
    redis_key,
)
from apirouter.redis_client import RedisClient, RedisError
from apirouter.usage import UsageItem
from supervisor import metrics
from supervisor.give_way import give_way

log = logging.getLogger("apirouter.audit")

# Rows per INSERT statement: executemany binds and steps one row at a time (~1.2 µs a row);
# one statement of ROWS_PER_INSERT rows costs ~0.7 µs a row. INSERT OR IGNORE applies per
# row, in order, as before: the first row of a key wins, within a statement too.
ROWS_PER_INSERT = 100
_ROW = "(?, ?, ?, ?, ?)"
_CHUNK_PARAMS = 5 * ROWS_PER_INSERT
_INSERT_CHUNK = INSERT.replace(f"VALUES {_ROW}", "VALUES " + ", ".join([_ROW] * ROWS_PER_INSERT))
REDIS_TIMEOUT_S = 2.0
# A Redis store is usually the workers' admission Redis too. A drain's batch written back to
# back (two SETs of ~1 KB a record) kept Redis and the supervisor busy at once for ~1 ms every
# drain, and on a small host the requests then waited for a CPU: their admission calls behind
# Redis, their other hops behind both. So a batch is trickled: chunks of REDIS_CHUNK records,
# PACE_GAP_S apart. A chunk costs the supervisor a round trip (~80 µs of CPU), so a batch
# goes in MAX_CHUNKS chunks at most, of more records each when it is bigger (up to
# MAX_CHUNK_RECORDS: one pipeline must not hold Redis long either; past 1,024 records, more
# chunks, as the 128-record chunks before); and the gaps of one batch add up to PACE_BUDGET_S
# at most, well inside the drain's 0.1 s. Measured on 2 cores, python -m bench.overhead
# --redis, 8 runs each alternating with the old code: c=1 added p99 0.81 -> 0.70 ms,
# supervisor CPU 8.1 -> 9.4 µs a request; c=32 (4 runs each) router CPU 69.4 / 69.9 µs,
# added p99 4.17 / 4.16 ms.
# A chunk's SETs go pipelined, their replies counted a run at a time (RedisClient.
# pipeline_checked). One Lua script a chunk (a redis.pcall a SET) cut the supervisor's CPU
# about as much but cost redis-server ~9 -> ~15 µs a record (perf/auditput.py).
REDIS_CHUNK = 32
MAX_CHUNKS = 8
MAX_CHUNK_RECORDS = 128
PACE_GAP_S = 0.003
PACE_BUDGET_S = (MAX_CHUNKS - 1) * PACE_GAP_S  # 21 ms
PURGE_EVERY_S = 300.0
PROBE_S = 2.0


def chunking(records: int, paced: bool) -> tuple[int, float]:
    """Records a chunk and seconds between chunks, for a batch going into a Redis store."""
    size = min(MAX_CHUNK_RECORDS, max(REDIS_CHUNK, -(-records // MAX_CHUNKS)))
    chunks = -(-records // size)
    if not paced or chunks < 2:
        return size, 0.0
    return size, min(PACE_GAP_S, PACE_BUDGET_S / (chunks - 1))


async def _pause(seconds: float) -> None:
    """The gap between two chunks (one name for tests to watch)."""
    await asyncio.sleep(seconds)


class LocalPut:
    """The local store's write of one batch, to run on a worker thread: the JSONL sink runs
    it on the thread that made the batch durable (``AuditWriter.put`` runs it otherwise).
    Never raises: the outcome is kept for ``put`` to report on the event loop."""

    def __init__(self, writer: AuditWriter, items: list[UsageItem], paced: bool = False
                 ) -> None:
        self.writer = writer
        self.items = items
        self.paced = paced  # giving way between statements (supervisor.give_way)
        self.done = False
        self.error: Exception | None = None

    def __call__(self, lines: bytes | None = None) -> None:
        """``lines``: the batch's records, each followed by a newline, in order, if the
        caller has them joined already (the JSONL sink's write)."""
        try:
            self.writer._put_local(self.items, self.paced, lines)
        except Exception as e:
            self.error = e
        self.done = True


class AuditWriter:
    def __init__(self, spec: str, ttl_s: int, on_state: Callable[[], None] = lambda: None
                 ) -> None:
        self.spec = spec
        self.kind, self.where = parse_store(spec)
        self.ttl_s = ttl_s
        ttl = str(ttl_s).encode()
        self._ttl_arg = b"$%d\r\n%s\r\n" % (len(ttl), ttl)
        # Both SETs of a record, less its record key's org prefix and id, its record, its id
        # and its org (_set_command); the first-org key is its prefix and the id.
        first = redis_key("").encode()
        self._first_len = len(first)
        tail = b"\r\n$2\r\nEX\r\n" + self._ttl_arg.replace(b"%", b"%%") + b"$2\r\nNX\r\n"
        self._pair = (b"*6\r\n$3\r\nSET\r\n$%d\r\n%s%s\r\n$%d\r\n%s" + tail +
                      b"*6\r\n$3\r\nSET\r\n$%d\r\n" + first.replace(b"%", b"%%") +
                      b"%s\r\n%s" + tail[2:])
        self._orgs: dict[str | None, tuple[bytes, bytes]] = {}
        self.on_state = on_state
        self.ok = True
        self.last_error: str | None = None
        self._redis: RedisClient | None = None
        self._db: sqlite3.Connection | None = None
        self._purged_at = 0.0
        self._written_at = 0.0
        if self.kind == "redis":
            # The project's pipelined client: redis-py spends ~25 µs of CPU per SET here.
            self._redis = RedisClient(self.where)
        else:
            os.makedirs(self.where, mode=0o700, exist_ok=True)
            index = os.path.join(self.where, INDEX_NAME)
            os.close(os.open(index, os.O_RDWR | os.O_CREAT, 0o600))  # owner-only
            db = sqlite3.connect(index, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(CREATE_TABLE)
            self._db = db

    def local_put(self, items: list[UsageItem], paced: bool = False) -> LocalPut | None:
        """The batch's write for a thread the caller already goes to (local store only);
        ``paced``: giving way to other processes between its statements."""
        return LocalPut(self, items, paced) if self._db is not None else None

    async def put(self, items: list[UsageItem], ran: LocalPut | None = None,
                  paced: bool = True) -> None:
        """Store the batch; ``ran``: its ``local_put``, if a sink has run it already;
        ``paced``: trickled into a Redis store (see REDIS_CHUNK), else at once."""
        try:
            if self._redis is not None:
                size, gap = chunking(len(items), paced)
                for start in range(0, len(items), size):
                    if start and gap:
                        await _pause(gap)
                    chunk = items[start:start + size]
                    failed = await self._redis.pipeline_checked(
                        b"".join(self._set_command(i) for i in chunk), 2 * len(chunk),
                        REDIS_TIMEOUT_S)
                    if failed is not None:
                        raise failed
            else:
                job = ran if ran is not None and ran.done else LocalPut(self, items, paced)
                if not job.done:
                    await asyncio.to_thread(job)
                if job.error is not None:
                    raise job.error
        except Exception as e:
            metrics.AUDIT_ERRORS.inc()
            self._state(False, f"{type(e).__name__}: {e}"[:300])
            return
        metrics.AUDIT_WRITES.inc(len(items))
        self._written_at = time.monotonic()
        self._state(True, None)

    async def probe_forever(self) -> None:
        """PING an idle Redis store every PROBE_S (writes are probe enough while busy)."""
        while self._redis is not None:
            await asyncio.sleep(PROBE_S)
            if time.monotonic() - self._written_at < PROBE_S:
                continue
            try:
                reply = await self._redis.execute("PING", timeout=REDIS_TIMEOUT_S)
                if isinstance(reply, RedisError):
                    raise reply
            except Exception as e:
                self._state(False, f"{type(e).__name__}: {e}"[:300])
                continue
            self._state(True, None)

    def _set_command(self, item: UsageItem) -> bytes:
        """SET audit:rec:..:<org>:<id> <record> EX ttl NX, and SET audit:first:<id> <org> EX
        ttl NX (the id's first org, for admin lookups), encoded in one formatting step: the
        keys are their prefix (redis_key's, kept per org) and the id. Two steps and the keys
        made by redis_key each cost ~2.6 µs a record, this ~0.75 (128 records)."""
        raw, rid, org, _ = item
        kept = self._orgs.get(org)
        if kept is None:
            kept = self._org_parts(org)
        prefix, org_bulk = kept
        r = rid.encode()
        n = len(r)
        return self._pair % (len(prefix) + n, prefix, r, len(raw), raw, self._first_len + n, r,
                             org_bulk)

    def _org_parts(self, org: str | None) -> tuple[bytes, bytes]:
        """An org's record-key prefix and the bulk string of its name (kept)."""
        if len(self._orgs) >= 4096:
            self._orgs.clear()
        o = (org or "").encode()
        kept = self._orgs[org] = (redis_key("", org or "").encode(),
                                  b"$%d\r\n%s\r\n" % (len(o), o))
        return kept

    def _put_local(self, items: list[UsageItem], paced: bool = False,
                   lines: bytes | None = None) -> None:
        """Append the records to this hour's file (``lines``: them joined, each followed by
        a newline, if the caller has that), then index them. Neither is fsync'd: the durable
        copy is the usage sink; a lookup checks what it reads (workers.audit_reader)."""
        assert self._db is not None
        now = time.time()
        hour = int(now // 3600)
        path = hour_file(self.where, hour)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            offset = os.fstat(fd).st_size
            params: list[str | int] = []  # the rows' values, one flat list
            for raw, request_id, org, _ in items:
                n = len(raw)
                params += (request_id, org or "", hour, offset, n)
                offset += n + 1
            if lines is None:  # (the last line's newline joined in, not a copy of the batch)
                lines = b"\n".join([item.raw for item in items] + [b""])
            os.write(fd, lines)
        finally:
            os.close(fd)
        full = len(params) - len(params) % _CHUNK_PARAMS
        if paced:  # (between the hour file's write and the index's statements)
            give_way()
        with self._db:  # one transaction: every row of the batch, or none
            self._db.execute("BEGIN")
            for start in range(0, full, _CHUNK_PARAMS):
                if start and paced:  # a statement is ~0.1 ms: the data plane goes first
                    give_way()
                self._db.execute(_INSERT_CHUNK, params[start:start + _CHUNK_PARAMS])
            self._db.executemany(INSERT, [params[k:k + 5] for k in range(full, len(params), 5)])
        if now - self._purged_at > PURGE_EVERY_S:
            self._purged_at = now
            self._purge(int((now - self.ttl_s) // 3600))

    def _purge(self, oldest_hour: int) -> None:
        """Drop the hours wholly older than the TTL: their rows, then their files."""
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(PURGE, (oldest_hour,))
        for name in os.listdir(self.where):
            stem = name[:-len(".log")]
            if name.endswith(".log") and stem.isdigit() and int(stem) < oldest_hour:
                os.unlink(os.path.join(self.where, name))

    def _state(self, ok: bool, error: str | None) -> None:
        self.last_error = error
        if ok != self.ok:
            if ok:
                log.info("audit store %s writable again", self.kind)
            else:
                log.error("audit store %s failed (%s): lookups miss new records; usage "
                          "export continues", self.kind, error)
            self.ok = ok
            self.on_state()  # republishes status(): last_error is already current

    def status(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "degraded", "kind": self.kind,
                "ttl_s": self.ttl_s, "last_error": self.last_error}

    async def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._db is not None:
            self._db.close()
