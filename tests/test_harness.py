"""The service fixtures start real servers that later issues build on: prove each one works."""

from __future__ import annotations

import asyncio
import uuid

import aetcd
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from tests.harness import EtcdServer, KafkaBroker, RedisServer


async def test_redis_server_answers_commands_and_lua(redis_server: RedisServer) -> None:
    client = aioredis.from_url(redis_server.url)
    try:
        await client.set("harness:k", "v")
        assert await client.get("harness:k") == b"v"
        incr = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        assert await incr(keys=["harness:n"], args=[5]) == 5
    finally:
        await client.aclose()


async def test_etcd_put_get_and_watch(etcd_server: EtcdServer) -> None:
    async with aetcd.Client(host="127.0.0.1", port=etcd_server.port) as client:
        await client.put(b"/harness/a", b"1")
        got = await client.get(b"/harness/a")
        assert got is not None and got.value == b"1"
        watch = await client.watch_prefix(b"/harness/")
        await client.put(b"/harness/b", b"2")
        async for event in watch:
            assert event.kv.key == b"/harness/b" and event.kv.value == b"2"
            break
        await watch.cancel()


async def test_kafka_broker_round_trips_a_record(kafka_broker: KafkaBroker) -> None:
    topic = f"harness-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all",
                                enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"org-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap,
                                group_id=f"g-{topic}", auto_offset_reset="earliest",
                                session_timeout_ms=1000, heartbeat_interval_ms=100,
                                rebalance_timeout_ms=1000)
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), 20)
        assert (msg.key, msg.value) == (b"org-1", b"hello")
    finally:
        await consumer.stop()
