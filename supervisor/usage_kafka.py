"""The Kafka usage sink: publish when Kafka takes records, spool to disk when it does not.

Policy, in order of preference for a batch the drainer hands over:

1. Kafka is connected and the spool is empty: publish (acks=all, key = org) and wait for
   every acknowledgement, at most ``timeout_s``.
2. Otherwise, or when that fails: append the batch to the disk spool (fsync'd) and mark Kafka
   down. ``accept`` returns once the records are durable either way; only then does the
   drainer consume them from the worker rings.

A background task reconnects with backoff, and while the spool is not empty replays it in
order, a chunk at a time, moving the spool's cursor (and deleting replayed segments) after
each acknowledged chunk. New batches keep going to the spool until the replay has caught up,
so Kafka sees records in the order they were drained. A batch whose acknowledgement timed out
may still land in Kafka and then again from the spool: such duplicates are byte-identical,
with the same request id. While idle, the connection is probed with a metadata request so
readyz shows an outage before the next record needs it.

A record Kafka can never take (over 1 MB, a default broker's message.max.bytes, or refused by
the broker as too large: MessageSizeTooLargeError, found by sending the batch's records one at
a time) is appended to the dead-letter file ``dead-letter.jsonl`` beside the spool (fsync'd,
counted in router_usage_dead_letter_total, logged) instead of failing its batch: retrying it
could only fail again, and it would hold up every record spooled behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from apirouter.usage import UsageItem, read_item
from supervisor import metrics
from supervisor.usage_spool import Spool

log = logging.getLogger("apirouter.usage")

REPLAY_CHUNK = 1000
MAX_BATCH_BYTES = 256 * 1024
# Kafka's default message.max.bytes is 1,048,588 (record batch included): a record above this
# is refused by a broker with default settings, and records are ~500 bytes, so one this large
# is a fault to set aside, not to retry.
MAX_RECORD_BYTES = 1_000_000
DEAD_LETTER_FILE = "dead-letter.jsonl"
_PARTITIONER = DefaultPartitioner()
IDLE_PROBE_S = 2.0
MAX_BACKOFF_S = 5.0


class KafkaSink:
    kind = "kafka"

    def __init__(self, bootstrap: str, topic: str, spool_dir: str, *, idempotence: bool,
                 compression: str, timeout_s: float,
                 on_state: Callable[[], None] = lambda: None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.idempotence = idempotence
        self.compression = None if compression == "none" else compression
        self.timeout_s = timeout_s
        self.on_state = on_state
        self.spool = Spool(spool_dir)
        self.dead_letter_path = os.path.join(os.path.dirname(os.path.abspath(spool_dir)),
                                             DEAD_LETTER_FILE)
        self.dead_lettered = 0
        self.producer: AIOKafkaProducer | None = None
        self.connected = False
        self.last_error: str | None = None
        self._spool_pending = not self.spool.empty()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_send = 0.0
        self._reported_corrupt = self.spool.corrupt_entries

    # -- connection --------------------------------------------------------------------------

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, client_id="apirouter-supervisor", acks="all",
            enable_idempotence=self.idempotence, compression_type=self.compression,
            linger_ms=5, max_batch_size=MAX_BATCH_BYTES, max_request_size=4 * 1024 * 1024,
            request_timeout_ms=max(1000, int(self.timeout_s * 1000)), retry_backoff_ms=100,
            metadata_max_age_ms=30_000)

    async def _connect(self) -> None:
        producer = self._new_producer()
        try:
            await asyncio.wait_for(producer.start(), self.timeout_s)
        except BaseException:
            await self._stop(producer)
            raise
        self.producer = producer
        self._set_connected(True, None)

    async def _stop(self, producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), 2.0)
        except Exception as e:
            log.debug("kafka producer did not stop cleanly: %s", type(e).__name__)

    def _set_connected(self, up: bool, error: str | None) -> None:
        changed = up != self.connected
        self.connected = up
        self.last_error = error
        metrics.USAGE_SINK_UP.set(1 if up else 0)
        if changed:
            if up:
                log.info("kafka %s reachable: publishing usage records to %s", self.bootstrap,
                         self.topic)
            else:
                log.error("kafka %s unavailable (%s): usage records go to the spool in %s",
                          self.bootstrap, error, self.spool.directory)
            self.on_state()

    async def _down(self, error: BaseException) -> None:
        metrics.USAGE_SINK_ERRORS.labels("kafka").inc()
        producer, self.producer = self.producer, None
        self._set_connected(False, f"{type(error).__name__}: {error}"[:300])
        if producer is not None:
            await self._stop(producer)

    # -- publishing --------------------------------------------------------------------------

    async def _send(self, items: list[UsageItem]) -> None:
        """Publish and wait for every acknowledgement; records Kafka cannot take go to the
        dead-letter file (see the module docstring)."""
        fit = [i for i in items if len(i.raw) <= MAX_RECORD_BYTES]
        if len(fit) < len(items):
            await self._dead_letter([i for i in items if len(i.raw) > MAX_RECORD_BYTES],
                                    f"larger than {MAX_RECORD_BYTES} bytes")
        if not fit:
            return
        try:
            await self._send_batches(fit)
        except MessageSizeTooLargeError:
            for item in fit:  # which one? each alone: the broker refuses only that one again
                try:
                    await self._send_batches([item])
                except MessageSizeTooLargeError:
                    await self._dead_letter([item], "refused by the broker as too large")

    async def _dead_letter(self, items: list[UsageItem], why: str) -> None:
        def append() -> None:
            fd = os.open(self.dead_letter_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, b"".join(i.raw + b"\n" for i in items))
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(append)
        self.dead_lettered += len(items)
        metrics.USAGE_DEAD_LETTER.inc(len(items))
        log.error("%d usage records Kafka cannot take (%s) written to %s, e.g. request %s",
                  len(items), why, self.dead_letter_path, items[0].request_id)

    async def _send_batches(self, items: list[UsageItem]) -> None:
        """Records are grouped per partition (the Java client's murmur2 of the org, as
        producer.send would choose) and sent as whole batches: aiokafka's per-message send
        costs ~14 µs of CPU a record, this ~3."""
        producer = self.producer
        if producer is None:
            raise ConnectionError("not connected")

        async def send_all() -> None:
            partitions = sorted(await producer.partitions_for(self.topic))
            groups: dict[int, list[UsageItem]] = {}
            keys: dict[str | None, int] = {}
            for item in items:
                p = keys.get(item.org)
                if p is None:
                    key = item.org.encode() if item.org else None
                    p = keys[item.org] = _PARTITIONER(key, partitions, partitions)
                groups.setdefault(p, []).append(item)
            acks = []
            for partition, group in groups.items():
                batch = producer.create_batch()
                for item in group:
                    key = item.org.encode() if item.org else None
                    if batch.append(key=key, value=item.raw, timestamp=None) is None:
                        acks.append(await producer.send_batch(batch, self.topic,
                                                              partition=partition))
                        batch = producer.create_batch()
                        if batch.append(key=key, value=item.raw, timestamp=None) is None:
                            # _send keeps records an empty batch cannot hold away from here
                            raise MessageSizeTooLargeError(
                                f"a {len(item.raw)}-byte usage record exceeds the batch")
                acks.append(await producer.send_batch(batch, self.topic, partition=partition))
            await asyncio.gather(*acks)

        await asyncio.wait_for(send_all(), self.timeout_s)
        self._last_send = time.monotonic()

    async def accept(self, items: list[UsageItem],
                     then: Callable[[bytes | None], None] | None = None) -> None:
        """``then`` is not run here (nothing of this sink runs on a thread per batch): the
        audit store runs its write itself."""
        async with self._lock:
            if self.connected and not self._spool_pending:
                try:
                    await self._send(items)
                    metrics.USAGE_PUBLISHED.inc(len(items))
                    return
                except Exception as e:
                    await self._down(e)
            await self._spool_append(items)

    async def _spool_append(self, items: list[UsageItem]) -> None:
        try:
            await asyncio.to_thread(self.spool.append, [i.raw for i in items])
        except OSError:
            metrics.USAGE_SINK_ERRORS.labels("spool").inc()
            raise  # nothing consumed: the records stay in the rings
        self._spool_pending = True
        metrics.USAGE_SPOOLED.inc(len(items))
        self._wake.set()

    # -- the background task: reconnect, replay, probe -------------------------------------

    async def start(self) -> None:
        metrics.USAGE_SINK_UP.set(0)
        try:
            await self._connect()
        except Exception as e:
            self._set_connected(False, f"{type(e).__name__}: {e}"[:300])
            self.on_state()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        backoff = 0.25
        while True:
            try:
                if not self.connected:
                    try:
                        await self._connect()
                        backoff = 0.25
                    except Exception as e:
                        self.last_error = f"{type(e).__name__}: {e}"[:300]
                        self._retry_now.clear()
                        try:  # `apirouterctl usage --replay` cuts the wait short
                            await asyncio.wait_for(self._retry_now.wait(), backoff)
                        except TimeoutError:
                            pass
                        backoff = min(MAX_BACKOFF_S, backoff * 2)
                        continue
                if self._spool_pending:
                    await self._replay_chunk()
                    continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_PROBE_S)
                except TimeoutError:
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage export task failed; retrying")
                await asyncio.sleep(1.0)

    async def _replay_chunk(self) -> None:
        async with self._lock:
            batch = await asyncio.to_thread(self.spool.read, REPLAY_CHUNK)
            self._count_corrupt()
            items = [it for raw in batch.records if (it := read_item(raw)) is not None]
            if items:
                try:
                    await self._send(items)
                except Exception as e:
                    await self._down(e)
                    return
                metrics.USAGE_PUBLISHED.inc(len(items))
                metrics.USAGE_REPLAYED.inc(len(items))
            await asyncio.to_thread(self.spool.advance, batch.end)
            if not batch.records:
                self._spool_pending = False
                log.info("usage spool replayed to kafka and truncated")

    async def _probe(self) -> None:
        if self.producer is None or time.monotonic() - self._last_send < IDLE_PROBE_S:
            return
        try:
            ok = await asyncio.wait_for(self.producer.client.force_metadata_update(),
                                        self.timeout_s)
        except Exception as e:
            await self._down(e)
            return
        if not ok:
            await self._down(ConnectionError("metadata request failed"))

    def _count_corrupt(self) -> None:
        new = self.spool.corrupt_entries - self._reported_corrupt
        if new > 0:
            metrics.USAGE_SPOOL_CORRUPT.inc(new)
            log.error("skipped %d torn or corrupt spool entries in %s", new,
                      self.spool.directory)
            self._reported_corrupt = self.spool.corrupt_entries

    def replay_now(self) -> None:
        """Reconnect (if need be) and replay the spool without waiting for the backoff."""
        self._retry_now.set()
        self._wake.set()

    # -- state -------------------------------------------------------------------------------

    async def refresh_gauges(self) -> None:
        async with self._lock:
            pending, oldest, records = await asyncio.to_thread(
                lambda: (self.spool.pending_bytes(), self.spool.oldest_appended_at(),
                         self.spool.pending_records()))
        metrics.USAGE_SPOOL_BYTES.set(pending)
        metrics.USAGE_SPOOL_RECORDS.set(records)
        metrics.USAGE_SPOOL_AGE.set(max(0.0, time.time() - oldest) if oldest else 0.0)

    def status(self) -> dict[str, Any]:
        return {"status": "ok" if self.connected else "degraded", "kind": self.kind,
                "bootstrap": self.bootstrap, "topic": self.topic, "connected": self.connected,
                "spooling": self._spool_pending, "last_error": self.last_error,
                "dead_lettered": self.dead_lettered}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.producer is not None:
            await self._stop(self.producer)
            self.producer = None
