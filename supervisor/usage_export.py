"""Usage accounting in the supervisor, assembled: the usage segment, the sink, the audit store
and the drainer that moves records between them.

Choices made here, at boot (changing them needs a restart):

- sink: Kafka when ``kafka_bootstrap`` is set (with its disk spool in SPOOL_DIR/kafka),
  otherwise JSONL files in SPOOL_DIR;
- audit store: Redis at ``redis_url`` when set, otherwise SQLite in SPOOL_DIR.

Shutdown order matters: the workers stop first, then the rings are drained one last time, and
the segment is unlinked only if it is empty (otherwise the next start recovers it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from apirouter.audit import AUDIT_STORE_ENV, LOCAL_DIR_NAME
from apirouter.config import ServerConfig
from apirouter.shm import segment_name
from apirouter.usage_ring import USAGE_SEGMENT_ENV, create_usage_segment, unlink_segment
from supervisor.audit_writer import AuditWriter
from supervisor.usage_drain import Sink, UsageDrainer, recover_abandoned
from supervisor.usage_jsonl import JsonlSink
from supervisor.usage_kafka import KafkaSink

log = logging.getLogger("apirouter.usage")


def spool_dir(server: ServerConfig, run_dir: str) -> str:
    return os.path.abspath(server.spool_dir or os.path.join(run_dir, "spool"))


class UsageExport:
    def __init__(self, server: ServerConfig, run_dir: str, slots: int,
                 on_state: Callable[[], None]) -> None:
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
        self.shm = create_usage_segment(segment_name(os.getpid(), "usage"), slots,
                                        server.usage_ring_bytes)
        self.drainer = UsageDrainer(self.shm, run_dir, self.sink, self.audit)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.sink.start()
        await recover_abandoned(self.sink, self.audit, self.run_dir)
        self._task = asyncio.ensure_future(self.drainer.run())

    def worker_env(self) -> dict[str, str]:
        return {USAGE_SEGMENT_ENV: self.shm.name, AUDIT_STORE_ENV: self.audit_spec}

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
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
