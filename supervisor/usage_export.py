"""Usage accounting in the supervisor, assembled: the usage segment, the sink, the audit store
and the drainer that moves records between them.

Choices made here, at boot (changing them needs a restart):

- sink: Kafka when ``kafka_bootstrap`` is set (with its disk spool in SPOOL_DIR/kafka),
  otherwise JSONL files in SPOOL_DIR;
- audit store: Redis at ``redis_url`` when set, otherwise SQLite in SPOOL_DIR.

The usage segment is named by the run directory's instance id: a supervisor started after one
that died (SIGKILL, OOM, a container restart in a fresh PID namespace) attaches to the same
segment and simply becomes its consumer, so what the workers wrote in between — the orphaned
pool goes on serving — is exported, and workers still writing into it are not disturbed.

Shutdown order matters: the workers stop first, then the rings are drained one last time, and
the segment is unlinked only if it is empty (otherwise the next start takes it over).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

from apirouter.audit import AUDIT_STORE_ENV, AUDIT_TTL_ENV, LOCAL_DIR_NAME
from apirouter.config import ServerConfig
from apirouter.shm import SegmentError, segment_name
from apirouter.usage_ring import (
    USAGE_SEGMENT_ENV,
    open_usage_segment,
    read_header,
    unlink_segment,
)
from supervisor.audit_writer import AuditWriter
from supervisor.usage_drain import Sink, UsageDrainer
from supervisor.usage_jsonl import JsonlSink
from supervisor.usage_kafka import KafkaSink

log = logging.getLogger("apirouter.usage")
SHM_DIR = "/dev/shm"


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def share_one_malloc_arena() -> bool:
    """Make threads started from now on allocate from the main malloc arena (glibc).

    Batches are written to disk and to the audit store in a worker thread, and a thread's
    own arena gives its large blocks (the joined batch, SQLite's pages) back to the kernel as
    soon as they are freed, so every batch paid its page faults again: measured, the JSONL
    append cost ~1.8x and the audit write ~1.3x in a thread what they cost on the loop's
    thread, 0.6-0.9 ms of supervisor CPU per drain. The supervisor's few threads seldom
    allocate at once, so sharing the arena costs no contention worth measuring. Returns
    whether the C library took the setting (other C libraries: nothing changes)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


def spool_dir(server: ServerConfig, run_dir: str) -> str:
    return os.path.abspath(server.spool_dir or os.path.join(run_dir, "spool"))


class UsageExport:
    def __init__(self, server: ServerConfig, run_dir: str, instance: str, slots: int,
                 on_state: Callable[[], None]) -> None:
        share_one_malloc_arena()  # before the first worker thread is started
        self.run_dir = run_dir
        self.spool_dir = spool_dir(server, run_dir)
        self.sink: Sink
        if server.kafka_bootstrap:
            self.sink = KafkaSink(server.kafka_bootstrap, server.kafka_topic,
                                  os.path.join(self.spool_dir, "kafka"),
                                  idempotence=server.kafka_idempotence,
                                  compression=server.kafka_compression,
                                  timeout_s=server.kafka_timeout_s, on_state=on_state)
        else:
            self.sink = JsonlSink(self.spool_dir)
        self.audit_spec = (f"redis:{server.redis_url}" if server.redis_url
                           else f"local:{os.path.join(self.spool_dir, LOCAL_DIR_NAME)}")
        self.audit = AuditWriter(self.audit_spec, server.audit_ttl_s, on_state)
        self.shm = _open_segment(segment_name(instance, "usage"), slots,
                                 server.usage_ring_bytes)
        self.drainer = UsageDrainer(self.shm, run_dir, self.sink, self.audit)
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sink.start()
        self._task = asyncio.ensure_future(self.drainer.run())
        self._probe = asyncio.ensure_future(self.audit.probe_forever())

    def worker_env(self) -> dict[str, str]:
        return {USAGE_SEGMENT_ENV: self.shm.name, AUDIT_STORE_ENV: self.audit_spec,
                AUDIT_TTL_ENV: str(self.audit.ttl_s)}

    def status(self) -> dict[str, Any]:
        """The readyz checks this part contributes (published in the routing table)."""
        return {"usage_sink": self.sink.status(), "audit_store": self.audit.status()}

    def state(self) -> dict[str, Any]:
        spool = getattr(self.sink, "spool", None)
        return {"segment": self.shm.name, "spool_dir": self.spool_dir,
                "drained": self.drainer.drained,
                "spool_pending_bytes": spool.pending_bytes() if spool is not None else 0,
                **self.status()}

    async def stop(self) -> None:
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.drainer.drain_all()
        empty = self.drainer.empty()
        self.drainer.close()
        await self.sink.close()
        await self.audit.close()
        if empty:
            unlink_segment(self.shm)
        else:
            log.error("usage segment %s still holds records the sink did not take; the next "
                      "start recovers them", self.shm.name)
        self.shm.close()


def _open_segment(name: str, slots: int, capacity: int) -> shared_memory.SharedMemory:
    """This instance's usage segment: taken over if a predecessor left it, else created."""
    try:
        shm, created = open_usage_segment(name, slots, capacity)
    except SegmentError as e:
        # Not a segment this version can read (an upgrade changed the layout): keep it aside
        # for an operator, never delete records, and start a new one.
        aside = f"{name}.unreadable-{time.time_ns()}"
        os.rename(os.path.join(SHM_DIR, name), os.path.join(SHM_DIR, aside))
        log.error("%s; moved it to /dev/shm/%s", e, aside)
        shm, created = open_usage_segment(name, slots, capacity)
    if not created:
        had = read_header(shm)
        log.warning("took over usage segment %s left by the previous supervisor", name)
        if had != (slots, capacity):
            log.warning("usage segment %s keeps %d rings of %d bytes (usage_ring_bytes takes "
                        "effect once it is recreated)", name, *had)
    return shm
