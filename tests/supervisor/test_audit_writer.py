from __future__ import annotations

import time

import pytest

from apirouter.audit import redis_key
from apirouter.redis_client import RedisClient, encode_command
from apirouter.usage import read_item, usage_record
from supervisor.audit_writer import AuditWriter
from tests.harness import RedisServer


def _item(rid: str, org: str = "acme", ago: float = 0.0):
    raw = usage_record(kind="request", request_id=rid, ts_start=time.time() - ago,
                       ts_end=time.time() - ago,
                       endpoint="/v1/inference", key_id="k", org=org, model="m",
                       backend_id="b", decision_type="PRIMARY", attempts=1, status=200,
                       error_code=None, prompt_tokens=1, completion_tokens=2, cost_micro=0,
                       backend_s=0.001, table_generation=1, worker_pid=1)
    item = read_item(raw)
    assert item is not None
    return item


async def test_the_hand_encoded_set_matches_the_generic_encoder() -> None:
    w = AuditWriter("redis:redis://127.0.0.1:1/0", 3600)
    item = _item("req-1")
    assert w._set_command(item) == (
        encode_command("SET", redis_key("req-1", "acme"), item.raw, "EX", 3600, "NX")
        + encode_command("SET", redis_key("req-1"), "acme", "EX", 3600, "NX"))
    await w.close()


@pytest.mark.parametrize("kind", ["redis", "local"])
async def test_records_are_kept_per_org_and_the_first_of_each_wins(
        kind: str, redis_server: RedisServer, tmp_path) -> None:
    from workers.audit_reader import AuditReader

    spec = f"redis:{redis_server.url}" if kind == "redis" else f"local:{tmp_path}/audit"
    rid = f"dup-{time.monotonic_ns()}"  # the Redis server is shared by the session
    w = AuditWriter(spec, 600)
    first, other_org, replay = _item(rid, "acme"), _item(rid, "intruder"), _item(rid, "acme")
    await w.put([first])
    await w.put([other_org, replay])  # a client re-using an id overwrites nobody's record ...
    assert w.ok
    reader = AuditReader(spec)
    assert await reader.get(rid, "acme") == first.raw
    assert await reader.get(rid, "intruder") == other_org.raw  # ... nor is hidden by one
    assert await reader.get(rid, None) == first.raw  # admins: the id's first org
    assert await reader.get(rid, "nobody") is None
    assert await reader.get("other", None) is None
    reader.close()
    if kind == "redis":
        client = RedisClient(spec.removeprefix("redis:"))
        assert 0 < await client.execute("TTL", redis_key(rid, "acme"), timeout=2) <= 600
        client.close()
    await w.close()


async def test_a_dead_store_is_reported_not_raised() -> None:
    states = []
    w = AuditWriter("redis:redis://127.0.0.1:1/0", 60, on_state=lambda: states.append(1))
    await w.put([_item("x")])
    assert not w.ok and w.status()["status"] == "degraded" and states
    await w.close()


async def test_local_store_expires_whole_hours_and_checks_what_it_reads(tmp_path) -> None:
    from workers.audit_reader import AuditReader

    spec = f"local:{tmp_path}/audit"
    w = AuditWriter(spec, 3600)
    await w.put([_item("kept"), _item("torn")])
    reader = AuditReader(spec)
    assert (await reader.get("kept", "acme")) is not None
    log = next(p for p in (tmp_path / "audit").iterdir() if p.suffix == ".log")
    data = log.read_bytes()
    log.write_bytes(data[:len(data) - 20])  # a crash lost the end of the data file
    assert await reader.get("torn", "acme") is None  # the row points past the end: a miss
    hour = int(log.stem)
    w._purge(hour + 1)
    assert await reader.get("kept", "acme") is None and not log.exists()
    reader.close()
    await w.close()


async def test_local_lookups_expire_after_the_ttl_before_the_hourly_purge(tmp_path) -> None:
    """Files go by the hour; a record must still not be readable once audit_ttl_s passed."""
    from workers.audit_reader import AuditReader

    spec = f"local:{tmp_path}/audit"
    w = AuditWriter(spec, 60)
    await w.put([_item("old", ago=61), _item("fresh")])
    reader = AuditReader(spec, ttl_s=60)
    assert await reader.get("old", "acme") is None
    assert await reader.get("fresh", "acme") is not None
    reader.close()
    await w.close()


async def test_an_idle_redis_store_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No writes, Redis gone, then back: the status follows it (readyz is not left 'ok')."""
    import asyncio

    from supervisor import audit_writer
    from tests.harness import free_port

    monkeypatch.setattr(audit_writer, "PROBE_S", 0.1)
    port = free_port()
    w = AuditWriter(f"redis:redis://127.0.0.1:{port}/0", 60)
    task = asyncio.ensure_future(w.probe_forever())
    try:
        for _ in range(100):
            if not w.ok:
                break
            await asyncio.sleep(0.05)
        assert not w.ok and w.last_error
        server = RedisServer(port=port)
        try:
            for _ in range(100):
                if w.ok:
                    break
                await asyncio.sleep(0.05)
            assert w.ok
        finally:
            server.stop()
            server.cleanup()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await w.close()


async def test_every_record_of_every_batch_is_found_byte_for_byte(tmp_path) -> None:
    """The local store indexes a batch in multi-row statements plus a remainder: every record
    of every batch size (within a statement, across statements, after earlier batches in the
    same hour file) is found byte for byte, and within a batch the first row of a key wins."""
    from workers.audit_reader import AuditReader

    spec = f"local:{tmp_path}/audit"
    w = AuditWriter(spec, 3600)
    batches = [[_item(f"b{b}-{i}" + "x" * (i * 7 % 50), org=f"org-é{i % 3}") for i in range(n)]
               for b, n in enumerate((1, 237, 100, 5))]
    first, again = _item("twice", "acme"), _item("twice", "acme", ago=5)
    assert first.raw != again.raw
    batches[1][150:150] = [first]
    batches[1][180:180] = [again]  # same statement as the first: ignored
    for batch in batches:
        await w.put(batch)
    assert w.ok
    reader = AuditReader(spec)
    for item in (i for batch in batches for i in batch if i is not again):
        assert await reader.get(item.request_id, item.org) == item.raw
    reader.close()
    await w.close()


async def test_a_batch_the_index_refuses_is_counted_and_leaves_no_half_batch(tmp_path) -> None:
    """A failure inside a batch's transaction rolls the whole batch's rows back (none is left
    pointing half-way), is counted and reported, and the next batch is indexed in full."""
    from supervisor import metrics
    from workers.audit_reader import AuditReader

    spec = f"local:{tmp_path}/audit"
    w = AuditWriter(spec, 3600)
    assert w._db is not None
    w._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_by_org WHEN "
                  "NEW.request_id = 'poison' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    errors = metrics.AUDIT_ERRORS._value.get()
    doomed = [_item(f"doomed-{i}") for i in range(230)]
    await w.put(doomed[:170] + [_item("poison")] + doomed[170:])
    assert not w.ok and metrics.AUDIT_ERRORS._value.get() == errors + 1
    later = [_item(f"later-{i}") for i in range(130)]
    await w.put(later)
    assert w.ok
    reader = AuditReader(spec)
    for item in doomed:
        assert await reader.get(item.request_id, "acme") is None
    for item in later:
        assert await reader.get(item.request_id, "acme") == item.raw
    reader.close()
    await w.close()


def test_a_batch_goes_in_small_chunks_of_a_bounded_count() -> None:
    """Chunks of REDIS_CHUNK records, MAX_CHUNKS of them at most (bigger chunks then, up to
    MAX_CHUNK_RECORDS), with gaps that add up to PACE_BUDGET_S at most, and only between two
    chunks of a paced batch."""
    from supervisor.audit_writer import (
        MAX_CHUNK_RECORDS,
        MAX_CHUNKS,
        PACE_BUDGET_S,
        PACE_GAP_S,
        REDIS_CHUNK,
        chunking,
    )

    assert chunking(200, True) == (REDIS_CHUNK, PACE_GAP_S)
    assert chunking(200, False) == (REDIS_CHUNK, 0.0)
    assert PACE_BUDGET_S < 0.1  # the gaps fit in the drain's interval
    for records in range(1, 5001):
        for paced in (True, False):
            size, gap = chunking(records, paced)
            chunks = -(-records // size)
            assert REDIS_CHUNK <= size <= MAX_CHUNK_RECORDS
            assert chunks <= MAX_CHUNKS or size == MAX_CHUNK_RECORDS, records
            if chunks <= MAX_CHUNKS:
                assert size == max(REDIS_CHUNK, -(-records // MAX_CHUNKS)), records
            if paced and chunks > 1:
                assert 0 < gap <= PACE_GAP_S and gap * (chunks - 1) <= PACE_BUDGET_S + 1e-9
            else:
                assert gap == 0.0, (records, paced)


@pytest.mark.parametrize("paced", [True, False])
async def test_a_batch_is_trickled_into_redis_and_stored_whole(
        paced: bool, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain's batch reaches Redis as chunks of REDIS_CHUNK records with a pause between
    each two (so the workers' admission calls are not queued behind it); unpaced (the last
    drain, or rings filling faster than the drain's pace) without pauses. Every record is
    stored either way."""
    from supervisor import audit_writer
    from workers.audit_reader import AuditReader

    spec = f"redis:{redis_server.url}"
    w = AuditWriter(spec, 600)
    assert w._redis is not None
    prefix = f"trickle-{paced}-{time.monotonic_ns()}"
    items = [_item(f"{prefix}-{i}") for i in range(200)]  # at most MAX_CHUNKS chunks of 32
    events: list[str] = []
    pipeline, pause = w._redis.pipeline_checked, audit_writer._pause

    async def counted(data: bytes, count: int, timeout: float | None):
        events.append(f"{count // 2} records")  # two SETs a record
        return await pipeline(data, count, timeout)

    async def timed(seconds: float) -> None:
        events.append(f"pause {seconds}")
        await pause(seconds)

    monkeypatch.setattr(w._redis, "pipeline_checked", counted)
    monkeypatch.setattr(audit_writer, "_pause", timed)
    await w.put(items, paced=paced)
    monkeypatch.undo()
    assert w.ok
    chunks = ["32 records"] * 6 + ["8 records"]
    if paced:
        gap = f"pause {audit_writer.PACE_GAP_S}"
        assert events == [e for c in chunks[:-1] for e in (c, gap)] + chunks[-1:]
    else:
        assert events == chunks
    reader = AuditReader(spec)
    for item in items[::37] + items[-1:]:
        assert await reader.get(item.request_id, "acme") == item.raw
    reader.close()
    await w.close()
