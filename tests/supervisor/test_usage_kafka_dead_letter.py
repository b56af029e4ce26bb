"""A record Kafka can never take goes to the dead-letter file; the spool replays past it."""

from __future__ import annotations

import asyncio
import os
import time

import orjson

from apirouter.usage import read_item
from supervisor import metrics
from supervisor.usage_kafka import KafkaSink
from supervisor.usage_spool import Spool
from tests.e2e.test_usage_export import consume
from tests.harness import KafkaBroker, free_port


def _raw(rid: str, pad: int = 0) -> bytes:
    return orjson.dumps({"request_id": rid, "org": "acme", "ts_end": time.time(),
                         "note": "x" * pad})


async def test_a_too_large_record_is_dead_lettered_and_does_not_block_the_replay(
        kafka_broker: KafkaBroker, tmp_path) -> None:
    topic = f"usage-dead-letter-{free_port()}"
    spool_dir = str(tmp_path / "spool" / "kafka")
    # Spooled during an outage: a record no request can carry, and ordinary ones behind it.
    Spool(spool_dir).append([_raw("before"), _raw("huge", 5_000_000), _raw("after-1"),
                             _raw("after-2")])
    sink = KafkaSink(kafka_broker.bootstrap, topic, spool_dir, idempotence=False,
                     compression="none", timeout_s=2.0)
    before = metrics.USAGE_DEAD_LETTER._value.get()
    await sink.start()
    try:
        # The spool belongs to the sink's replay thread: read it as operators do, through the
        # gauges the sink refreshes under its own lock (reading it from here raced a replay
        # that was deleting the segment).
        for _ in range(300):
            await sink.refresh_gauges()
            if metrics.USAGE_SPOOL_RECORDS._value.get() == 0 and not sink.status()["spooling"]:
                break
            await asyncio.sleep(0.05)
        assert metrics.USAGE_SPOOL_RECORDS._value.get() == 0, sink.status()
        assert metrics.USAGE_SPOOL_BYTES._value.get() == 0, sink.status()
        await sink.accept([r for raw in (_raw("live"), _raw("huge-2", 1_200_000))
                           if (r := read_item(raw))])
    finally:
        await sink.close()
    with open(os.path.join(tmp_path / "spool", "dead-letter.jsonl"), "rb") as f:
        dead = [orjson.loads(line)["request_id"] for line in f]
    assert dead == ["huge", "huge-2"]
    assert metrics.USAGE_DEAD_LETTER._value.get() == before + 2
    seen = await asyncio.to_thread(consume, kafka_broker.bootstrap, topic,
                                   {"before", "after-1", "after-2", "live"}, 20)
    assert {"before", "after-1", "after-2", "live"} <= seen.keys()
    assert not {"huge", "huge-2"} & seen.keys()
