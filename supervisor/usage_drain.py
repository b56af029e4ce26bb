"""The supervisor's side of usage hand-off: drain every worker ring into the sink.

Each tick copies records out of every ring (live workers' and dead workers' alike: the rings
belong to the supervisor's segment) and out of the workers' overflow files, hands them to the
sink, and only once the sink says they are durable (Kafka acknowledged, or fsync'd to disk)
consumes them: ring tails move, overflow files are deleted. A supervisor that dies between the
two steps re-reads the same records on the next drain: duplicates, never gaps. The audit store
is written after the sink: with the JSONL sink and the local store, on the sink's thread right
after the fsync, before the tails move (a crash in between writes the batch to it again, and
the first row of a key wins there too).

A ring whose frame fails its checks (length, checksum) is retried on the next ticks; if it is
still bad, the unread rest of that ring is copied into the quarantine directory and skipped
over, counted and logged. The other rings drain on regardless. An entry that is a sound frame
but not a usage record is quarantined the same way, never dropped silently.

Overflow files are imported once their worker has handed them over (``.ready``) or has died
(an ``.open`` file nobody holds the flock of): a live worker's file is never taken, whichever
supervisor — this one or a successor — is draining.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from itertools import compress
from multiprocessing import shared_memory
from typing import Any, Protocol

from apirouter.runstate import file_locked
from apirouter.usage import UsageItem, read_items
from apirouter.usage_ring import (
    OVERFLOW_DIR,
    RingConsumer,
    RingCorrupt,
    RingFills,
    read_header,
)
from supervisor import metrics
from supervisor.audit_writer import LocalPut
from supervisor.cadence import beat
from supervisor.give_way import DECODE_SLICE, PEEK_SLICE, give_way, in_slices

log = logging.getLogger("apirouter.usage")

POLL_INTERVAL_S = 0.05
# Batch at least this long, so per-batch costs (fsync, a thread hop, a Kafka round trip) are
# shared: measured, 50 ms cost ~4 µs more supervisor CPU a request than 100 ms, and 250 ms
# nothing less. Audit lookups find a record ~0.1 s after its response (a Redis store's
# batch is trickled in over up to ~21 ms more: AuditWriter.put).
FLUSH_INTERVAL_S = 0.1
FLUSH_FILL = 4  # ... unless a ring is more than 1/FLUSH_FILL full
OVERFLOW_SCAN_S = 0.5
GAUGE_REFRESH_S = 1.0
BATCH_BYTES = 4 << 20
QUARANTINE_DIR = "usage-quarantine"  # in the run directory
CORRUPT_STRIKES = 3  # drain ticks a bad frame is retried before it is quarantined


class Sink(Protocol):
    kind: str

    async def start(self) -> None: ...
    # ``then``: the local audit store's write (never raises), which a sink that writes on a
    # worker thread runs there once the batch is durable, passing the batch's records as it
    # wrote them (each followed by a newline, in order) or None; a sink may leave it to the
    # store.
    async def accept(self, items: list[UsageItem],
                     then: Callable[[bytes | None], None] | None = None) -> None: ...
    async def refresh_gauges(self) -> None: ...
    def replay_now(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class Audit(Protocol):
    def local_put(self, items: list[UsageItem], paced: bool = False) -> LocalPut | None: ...
    async def put(self, items: list[UsageItem], ran: LocalPut | None = None,
                  paced: bool = True) -> None: ...


def quarantine(run_dir: str, what: str, data: bytes) -> str:
    """Keep bytes that failed a check where an operator can look at them."""
    directory = os.path.join(run_dir, QUARANTINE_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{what}-{time.time_ns()}.bin")
    with open(path, "wb") as f:
        f.write(data)
    metrics.USAGE_QUARANTINED.inc()
    return path


def _items(raws: list[bytes], run_dir: str, paced: bool = False) -> list[UsageItem]:
    """The ring entries decoded (in slices, giving way between two, when ``paced``); those
    that are not usage records are quarantined."""
    out: list[UsageItem] = []
    bad: list[bytes] = []
    for some in in_slices(raws, DECODE_SLICE if paced else len(raws) or 1):
        taken, refused = read_items(some)
        out += taken
        bad += refused
    if bad:
        metrics.USAGE_MALFORMED.inc(len(bad))
        path = quarantine(run_dir, "malformed", b"\n".join(bad) + b"\n")
        log.error("%d ring entries are not usage records; kept in %s", len(bad), path)
    return out


class UsageDrainer:
    def __init__(self, shm: shared_memory.SharedMemory, run_dir: str, sink: Sink,
                 audit: Audit | None) -> None:
        slots, self.capacity = read_header(shm)
        self.rings = [RingConsumer(shm, i) for i in range(slots)]
        self._fills = RingFills(shm, self.rings)
        self.run_dir = run_dir
        self.overflow_dir = os.path.join(run_dir, OVERFLOW_DIR)
        self._strikes: dict[int, tuple[int, int]] = {}  # slot -> (bad position, times seen)
        self.sink = sink
        self.audit = audit
        self.drained = 0
        self._scanned_at = 0.0
        self._gauges_at = 0.0
        self._failing = False
        self._flushed_at = 0.0
        self._audit_put: asyncio.Future[None] | None = None

    def _due(self) -> tuple[list[int], bool]:
        """Every ring's fill (a drain reads them once, here) and whether a drain is due."""
        levels = self._fills.levels()
        # Polls fall on a grid (supervisor.cadence): the flush is due at the poll nearest to
        # FLUSH_INTERVAL_S after the last one, not a poll later for the time its peek took.
        due = (time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S - POLL_INTERVAL_S / 2
               or max(levels, default=0) * FLUSH_FILL > self.capacity)
        return levels, due

    async def run(self) -> None:
        # Every ring was empty at the last poll: this one is a point of the flush grid, and
        # flushes (the first after a busy spell may come 50 ms early: back onto the grid).
        idle = False
        while True:
            levels: list[int] = []
            try:
                levels, due = self._due()
                n = await self.drain_once(levels=levels) if due or idle else 0
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage drain failed; retrying")
                n = 0
                await asyncio.sleep(1.0)
            now = time.monotonic()
            if now - self._gauges_at > GAUGE_REFRESH_S:
                self._gauges_at = now
                metrics.USAGE_RING_FILL.set(
                    max(self._fills.levels(), default=0) / self.capacity)
                metrics.HEARTBEAT.set(time.time())
                await self.sink.refresh_gauges()
            if n:
                idle = False
                continue
            # On the grid the health tick wakes on too (supervisor.cadence). With every ring
            # empty, the next poll is the next flush: an idle supervisor wakes 10 times a
            # second, not 20, and a record waits no longer for its flush. The polls skipped
            # only look for a ring over a quarter full (FLUSH_FILL): from empty, at the best
            # rate a worker was measured to serve (~18,000 requests a second, ~550 bytes a
            # record: README), the default 1 MiB ring is at most ~94% full by the flush, and
            # a full one spills to the worker's overflow file, which the drain imports.
            idle = not any(levels)
            await beat(FLUSH_INTERVAL_S if idle else POLL_INTERVAL_S)

    async def drain_once(self, final: bool = False, levels: list[int] | None = None) -> int:
        """One pass over every ring that holds records (and, now and then, the overflow
        files); ``levels``: the rings' fills, if the caller has just read them."""
        raws: list[bytes] = []
        commits: list[tuple[RingConsumer, int]] = []
        levels = self._fills.levels() if levels is None else levels
        # The audit store is trickled (AuditWriter.put) unless the rings fill faster than
        # the drain's pace, or this is the last drain.
        paced = not final and max(levels, default=0) * FLUSH_FILL <= self.capacity
        # A drain at its pace gives way to the data plane between slices of its work
        # (supervisor.give_way); one that catches up, or the last one, goes straight through.
        pause = give_way if paced else None
        for ring in compress(self.rings, levels):
            if raws and pause:
                pause()
            try:
                records, position = ring.peek(BATCH_BYTES, pause, PEEK_SLICE)
            except RingCorrupt as e:
                self._corrupt(ring, e)
                continue
            self._strikes.pop(ring.slot, None)
            raws.extend(records)
            commits.append((ring, position))
            if len(raws) >= 20_000:
                break
        files: list[str] = []
        now = time.monotonic()
        if final or now - self._scanned_at > OVERFLOW_SCAN_S:
            self._scanned_at = now
            files = self._overflow_files(final)
            for path in files:
                with open(path, "rb") as f:
                    raws.extend(line for line in f.read().split(b"\n") if line)
        self._flushed_at = time.monotonic()
        if not raws:
            return 0
        items = _items(raws, self.run_dir, paced)
        job = self.audit.local_put(items, paced) if self.audit is not None and items else None
        if items:
            try:
                await self.sink.accept(items, job)
            except Exception as e:
                if not self._failing:
                    log.error("usage sink cannot take records (%s); they wait in the rings",
                              e)
                self._failing = True
                await asyncio.sleep(0.5)
                return 0
        self._failing = False
        for ring, position in commits:
            ring.commit(position)
        for path in files:
            os.unlink(path)
        self.drained += len(items)
        metrics.USAGE_DRAINED.inc(len(items))
        if self.audit is not None and items:
            # Shielded: the batch is consumed from the rings by now, so a stop that cancels
            # the drain (UsageExport.stop) must not cut its audit write short, between two
            # paced chunks; drain_all waits for it.
            self._audit_put = asyncio.ensure_future(self.audit.put(items, job, paced))
            await asyncio.shield(self._audit_put)
        return len(items)

    def _corrupt(self, ring: RingConsumer, e: RingCorrupt) -> None:
        """Retry a bad frame for a few ticks (a torn read heals), then quarantine the rest of
        the ring: its records cannot be framed, but its bytes are kept."""
        at, seen = self._strikes.get(ring.slot, (e.tail, 0))
        seen = seen + 1 if at == e.tail else 1
        self._strikes[ring.slot] = (e.tail, seen)
        if seen < CORRUPT_STRIKES:
            return
        path = quarantine(self.run_dir, f"ring{ring.slot}", ring.unread(e.tail, e.head))
        ring.commit(e.head)
        self._strikes.pop(ring.slot, None)
        log.error("%s: %d bytes quarantined in %s; the ring continues after them", e,
                  max(0, e.head - e.tail), path)

    def _overflow_files(self, final: bool) -> list[str]:
        try:
            names = sorted(os.listdir(self.overflow_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            path = os.path.join(self.overflow_dir, name)
            if name.endswith(".ready") or (name.endswith(".open") and not file_locked(path)):
                out.append(path)
        return out

    async def drain_all(self) -> None:
        """Everything that is in the rings now (at shutdown, after the workers stopped)."""
        if self._audit_put is not None:  # the audit write of a drain that was cancelled
            await self._audit_put
        for _ in range(1000):
            if await self.drain_once(final=True) == 0 and not self._strikes:
                return

    def empty(self) -> bool:
        return not any(self._fills.levels())

    def close(self) -> None:
        self._fills.release()
        for ring in self.rings:
            ring.release()
