"""Hand-off without sockets: worker producer → ring/overflow file → drainer → JSONL sink."""

from __future__ import annotations

import json
import os
import time

import jsonschema

from apirouter.shm import segment_name
from apirouter.usage import schema, usage_record
from apirouter.usage_ring import create_usage_segment, fill_levels, unlink_segment
from supervisor.audit_writer import AuditWriter
from supervisor.usage_drain import UsageDrainer
from supervisor.usage_jsonl import JsonlSink
from workers.usage_out import UsageOut


def _record(i: int, org: str = "acme") -> bytes:
    return usage_record(kind="request", request_id=f"r{i}", ts_start=time.time() - 0.01,
                        ts_end=time.time(), endpoint="/v1/chat/completions", key_id="k1",
                        org=org, model="m", backend_id="b", decision_type="PRIMARY",
                        attempts=1, status=200, error_code=None, prompt_tokens=3,
                        completion_tokens=5, cost_micro=12, backend_s=0.005,
                        table_generation=1, worker_pid=os.getpid())


def _lines(directory: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as f:
                out.extend(json.loads(line) for line in f)
    return out


async def test_a_full_ring_overflows_to_a_file_and_nothing_is_lost(tmp_path) -> None:
    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 2, 65536)
    try:
        out = UsageOut(shm.name, 1, str(tmp_path))
        for i in range(1000):  # ~450 bytes each: far more than a 64 KiB ring holds
            out.emit(_record(i))
        assert os.listdir(tmp_path / "usage-overflow")  # the overflow file exists
        out.rotate()
        sink = JsonlSink(str(tmp_path / "spool"))
        audit = AuditWriter(f"local:{tmp_path / 'spool' / 'audit'}", 3600)
        drainer = UsageDrainer(shm, str(tmp_path), sink, audit)
        await drainer.drain_all()
        got = _lines(str(tmp_path / "spool"))
        assert sorted(r["request_id"] for r in got) == sorted(f"r{i}" for i in range(1000))
        assert not os.listdir(tmp_path / "usage-overflow")  # imported, then removed
        for r in got[:50]:
            jsonschema.validate(r, schema())
        drainer.close()
        out.close()
        await audit.close()
    finally:
        shm.close()
        unlink_segment(shm)


async def test_a_corrupt_ring_is_quarantined_and_the_others_drain(tmp_path) -> None:
    """A frame whose checksum fails is retried, then the rest of its ring is kept in the
    quarantine directory (never silently skipped); the other rings are not held up."""
    from apirouter.usage_ring import RingProducer
    from supervisor import metrics

    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 2, 65536)
    try:
        bad, good = RingProducer(shm, 0), RingProducer(shm, 1)
        assert bad.put(_record(0)) and bad.put(_record(1))
        bad._data[8] ^= 0xFF  # flip a payload byte of the first frame: its crc32 fails
        for i in range(2, 12):
            assert good.put(_record(i))
        before = metrics.USAGE_QUARANTINED._value.get()
        sink = JsonlSink(str(tmp_path / "spool"))
        drainer = UsageDrainer(shm, str(tmp_path), sink, None)
        await drainer.drain_once()  # first sight of the bad frame: retried later, not dropped
        assert bad.fill() > 0
        assert {r["request_id"] for r in _lines(str(tmp_path / "spool"))} == {
            f"r{i}" for i in range(2, 12)}
        await drainer.drain_all()
        assert bad.fill() == 0 and drainer.empty()
        kept = os.listdir(tmp_path / "usage-quarantine")
        assert len(kept) == 1 and kept[0].startswith("ring0-")
        with open(tmp_path / "usage-quarantine" / kept[0], "rb") as f:
            assert b'"request_id":"r1"' in f.read()  # the bytes are kept for an operator
        assert metrics.USAGE_QUARANTINED._value.get() == before + 1
        drainer.close()
        for ring in (bad, good):
            ring.release()
    finally:
        shm.close()
        unlink_segment(shm)


async def test_an_overflow_file_a_live_worker_holds_is_never_taken(tmp_path) -> None:
    """A successor supervisor's final drain (or any drain) must leave the .open file of a
    live worker alone: the worker still appends to it (pids say nothing across namespaces;
    the worker's flock on its file does)."""
    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 2, 65536)
    try:
        out = UsageOut(shm.name, 0, str(tmp_path))
        for i in range(400):
            out.emit(_record(i))
        overflow = tmp_path / "usage-overflow"
        (open_file,) = [p for p in overflow.iterdir() if p.suffix == ".open"]
        sink = JsonlSink(str(tmp_path / "spool"))
        drainer = UsageDrainer(shm, str(tmp_path), sink, None)
        await drainer.drain_all()
        assert open_file.exists()  # still the worker's
        for i in range(400, 410):
            out.emit(_record(i))  # ... which goes on writing into it
        out.rotate()  # handed over on the heartbeat
        await drainer.drain_all()
        got = sorted(r["request_id"] for r in _lines(str(tmp_path / "spool")))
        assert got == sorted(f"r{i}" for i in range(410))
        assert not list(overflow.iterdir())
        drainer.close()
        out.close()
    finally:
        shm.close()
        unlink_segment(shm)


async def test_the_jsonl_sink_files_each_record_by_its_own_utc_day(tmp_path) -> None:
    """A batch across midnight UTC goes to two day files, in order, byte for byte; a batch
    within one day to one file."""
    from apirouter.usage import read_item

    midnight = 86400 * 20_500
    ends = [midnight - 2.5, midnight - 0.001, midnight, midnight + 3.0, midnight - 1.0]
    raws = [usage_record(kind="request", request_id=f"d{i}", ts_start=t - 0.01, ts_end=t,
                         endpoint="/v1/inference", key_id=None, org=None, model="m",
                         backend_id=None, decision_type=None, attempts=1, status=200,
                         error_code=None, prompt_tokens=None, completion_tokens=None,
                         cost_micro=0, backend_s=0.0, table_generation=1, worker_pid=1)
            for i, t in enumerate(ends)]
    items = [read_item(r) for r in raws]
    sink = JsonlSink(str(tmp_path))
    await sink.accept(items)  # type: ignore[arg-type]
    await sink.accept(items[:2])  # type: ignore[arg-type]
    before = (tmp_path / time.strftime("usage-%Y%m%d.jsonl", time.gmtime(midnight - 1)))
    after = (tmp_path / time.strftime("usage-%Y%m%d.jsonl", time.gmtime(midnight)))
    assert before.read_bytes() == b"\n".join([raws[0], raws[1], raws[4], raws[0], raws[1]]) + b"\n"
    assert after.read_bytes() == b"\n".join([raws[2], raws[3]]) + b"\n"


async def test_a_record_whose_end_time_no_calendar_names_does_not_stall_the_export(
        tmp_path) -> None:
    """A sound record with an absurd ts_end (1e300: valid JSON, no UTC day) is filed under
    the day it is written; the batch around it goes to its days and the rings drain (it
    used to raise in the sink on every retry, holding every ring's records back)."""
    from apirouter.usage_ring import RingProducer

    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 2, 65536)
    try:
        prod = RingProducer(shm, 0)
        absurd = _record(1).replace(b'"ts_end":', b'"ts_end":1e300,"was":', 1)
        raws = [_record(0), absurd, _record(2)]
        for raw in raws:
            assert prod.put(raw)
        sink = JsonlSink(str(tmp_path / "spool"))
        drainer = UsageDrainer(shm, str(tmp_path), sink, None)
        days = {time.strftime("usage-%Y%m%d.jsonl", time.gmtime())}
        assert await drainer.drain_once() == 3
        days.add(time.strftime("usage-%Y%m%d.jsonl", time.gmtime()))  # across midnight
        assert drainer.empty()
        (written,) = os.listdir(tmp_path / "spool")
        assert written in days
        assert (tmp_path / "spool" / written).read_bytes() == b"\n".join(raws) + b"\n"
        drainer.close()
        prod.release()
    finally:
        shm.close()
        unlink_segment(shm)


class _Embedded:
    """A drainer over a 2-ring segment into the JSONL sink and the local audit store."""

    def __init__(self, tmp_path, sink=None) -> None:
        from apirouter.usage_ring import RingProducer

        self.shm = create_usage_segment(segment_name(str(os.getpid()),
                                                     f"t{time.monotonic_ns()}"), 2, 1 << 20)
        self.prods = [RingProducer(self.shm, 0), RingProducer(self.shm, 1)]
        self.spool = tmp_path / "spool"
        self.sink = sink or JsonlSink(str(self.spool))
        self.audit = AuditWriter(f"local:{self.spool / 'audit'}", 3600)
        self.drainer = UsageDrainer(self.shm, str(tmp_path), self.sink, self.audit)

    def put(self, ids: list[str]) -> None:
        for n, rid in enumerate(ids):
            assert self.prods[n % 2].put(_record(0).replace(b'"r0"', f'"{rid}"'.encode()))

    async def found(self, ids: list[str]) -> list[str]:
        from workers.audit_reader import AuditReader

        reader = AuditReader(f"local:{self.spool / 'audit'}")
        try:
            return [rid for rid in ids if await reader.get(rid, "acme") is not None]
        finally:
            reader.close()

    async def close(self) -> None:
        for p in self.prods:
            p.release()
        self.drainer.close()
        await self.audit.close()
        unlink_segment(self.shm)
        self.shm.close()


async def test_the_embedded_pair_writes_a_batch_in_one_thread_trip(tmp_path, monkeypatch) -> None:
    """JSONL sink + local audit store: one trip to a worker thread per drain (the audit write
    runs on the sink's thread after the fsync), and every record reaches both."""
    import asyncio

    e = _Embedded(tmp_path)
    trips = []
    real = asyncio.to_thread

    async def counted(fn, *args):
        trips.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    ids = [f"one-trip-{i}" for i in range(300)]
    e.put(ids)
    assert await e.drainer.drain_once() == 300
    assert len(trips) == 1 and e.audit.ok
    assert sorted(r["request_id"] for r in _lines(str(e.spool))) == sorted(ids)
    assert await e.found(ids) == ids
    assert not any(fill_levels(e.drainer.rings))
    await e.close()


async def test_a_drain_gives_way_between_slices_and_exports_the_same(tmp_path,
                                                                      monkeypatch) -> None:
    """A drain at its pace checks the ring's frames, decodes them and indexes them in slices,
    giving way (sched_yield) between two, on the main thread and on the sink's thread; every
    record still reaches both stores in ring order, and an entry that is not a record is
    still quarantined. The last drain goes straight through (without slices there were no
    yields: the test failed)."""
    import threading

    import supervisor.give_way as give_way
    from supervisor.audit_writer import ROWS_PER_INSERT

    yields: list[str] = []
    real = give_way.os.sched_yield

    def counted() -> None:
        yields.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(give_way.os, "sched_yield", counted)
    e = _Embedded(tmp_path)
    ids = [f"slice-{i}" for i in range(450)]
    e.put(ids)
    assert e.prods[0].put(b'{"not": "a usage record"}')
    assert await e.drainer.drain_once() == 450
    main = threading.main_thread().name
    decode_slices = -(-451 // give_way.DECODE_SLICE)
    statements = 450 // ROWS_PER_INSERT  # (the remainder goes in one executemany)
    # Between decode slices, between the two rings, within each ring's ~117 KB of frames.
    assert yields.count(main) >= decode_slices - 1 + 1 + 2
    # Before the index's first statement, and between two.
    assert len(yields) - yields.count(main) == statements
    assert [r["request_id"] for r in _lines(str(e.spool))] == ids[0::2] + ids[1::2]
    assert await e.found(ids) == ids
    kept = os.listdir(tmp_path / "usage-quarantine")
    assert len(kept) == 1 and kept[0].startswith("malformed-")
    assert not any(fill_levels(e.drainer.rings))
    yields.clear()
    more = [f"last-{i}" for i in range(450)]
    e.put(more)
    assert await e.drainer.drain_once(final=True) == 450
    assert yields == [] and await e.found(more) == more
    await e.close()


async def test_an_index_write_that_fails_between_its_slices_leaves_no_half_batch(
        tmp_path, monkeypatch) -> None:
    """The local index still takes a batch in one transaction when it gives way between its
    statements: a failure after some of them were run leaves none of the batch's rows."""
    import supervisor.audit_writer as audit_writer
    from apirouter.usage import read_items

    e = _Embedded(tmp_path)
    calls: list[int] = []

    def failing() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted between two statements")

    monkeypatch.setattr(audit_writer, "give_way", failing)
    ids = [f"half-{i}" for i in range(450)]
    items, bad = read_items([_record(0).replace(b'"r0"', f'"{rid}"'.encode()) for rid in ids])
    assert not bad
    job = e.audit.local_put(items, paced=True)
    assert job is not None
    job()
    assert isinstance(job.error, RuntimeError) and len(calls) == 3
    assert await e.found(ids) == []
    monkeypatch.undo()
    job = e.audit.local_put(items, paced=True)
    assert job is not None
    job()
    assert job.error is None and await e.found(ids) == ids
    await e.close()


def test_a_paused_peek_returns_what_one_peek_returns() -> None:
    """A peek that pauses every ``pause_every`` bytes of frames (the drain gives way there)
    takes the same records and ends at the same position as one without: across the data
    area's end (a WRAP), up to ``max_bytes``, and before a bad frame."""
    from apirouter.usage_ring import RingConsumer, RingCorrupt, RingProducer

    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 1,
                               400_000)
    prod, cons = RingProducer(shm, 0), RingConsumer(shm, 0)
    try:
        for i in range(500):
            assert prod.put(_record(i))
        cons.commit(cons.peek(1 << 30)[1])
        for i in range(500, 1200):  # past the end of the data area: a WRAP on the way
            if not prod.put(_record(i)):
                break
        pauses: list[int] = []
        whole = cons.peek(1 << 30)
        assert len(whole[0]) > 500 and whole[1] == cons.head
        assert cons.peek(1 << 30, lambda: pauses.append(1), 32 << 10) == whole
        frames = sum(8 + len(r) for r in whole[0])
        assert frames // (32 << 10) - 2 <= len(pauses) <= frames // (32 << 10) + 2
        assert cons.peek(100_000, pauses.clear, 32 << 10) == cons.peek(100_000)
        # A bad frame ~200 KB in: both stop before it.
        at = cons.tail % cons.capacity
        for r in whole[0][:380]:
            at = (at + 8 + len(r)) % cons.capacity if at + 8 + len(r) <= cons.capacity else \
                8 + len(r)
        cons._data[at + 8] ^= 0xFF
        one = cons.peek(1 << 30)
        assert len(one[0]) == 380
        assert cons.peek(1 << 30, lambda: None, 32 << 10) == one
        cons.commit(one[1])  # met first, it raises either way
        for pause in (None, lambda: None):
            try:
                cons.peek(1 << 30, pause, 32 << 10)
                raise AssertionError("the bad frame was not reported")
            except RingCorrupt:
                pass
    finally:
        for ring in (prod, cons):
            ring.release()
        shm.close()
        unlink_segment(shm)


async def test_a_batch_the_sink_refuses_reaches_neither_store_and_stays_in_the_rings(
        tmp_path, monkeypatch) -> None:
    import supervisor.usage_jsonl as jsonl

    e = _Embedded(tmp_path)
    ids = [f"refused-{i}" for i in range(40)]
    e.put(ids)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonl.os, "fdatasync", full)
    assert await e.drainer.drain_once() == 0
    assert sum(fill_levels(e.drainer.rings)) > 0  # nothing consumed
    assert await e.found(ids) == []  # and nothing indexed: the audit store follows the sink
    monkeypatch.undo()
    assert await e.drainer.drain_once() == 40
    assert await e.found(ids) == ids
    assert not any(fill_levels(e.drainer.rings))
    await e.close()


async def test_an_audit_failure_on_the_sinks_thread_is_reported_and_export_goes_on(
        tmp_path) -> None:
    from supervisor import metrics

    e = _Embedded(tmp_path)
    assert e.audit._db is not None
    e.audit._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit_by_org "
                        "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    errors = metrics.AUDIT_ERRORS._value.get()
    ids = [f"unindexed-{i}" for i in range(25)]
    e.put(ids)
    assert await e.drainer.drain_once() == 25
    assert not e.audit.ok and metrics.AUDIT_ERRORS._value.get() == errors + 1
    assert "refused" in (e.audit.status()["last_error"] or "")
    assert sorted(r["request_id"] for r in _lines(str(e.spool))) == sorted(ids)
    assert not any(fill_levels(e.drainer.rings))  # the durable copy has them: consumed
    await e.close()


async def test_a_sink_that_leaves_the_audit_write_to_the_store(tmp_path) -> None:
    """The Kafka sink (here spooling: no broker) does not run the audit write; the store
    runs it itself after the ring tails move."""
    from supervisor.usage_kafka import KafkaSink

    sink = KafkaSink("127.0.0.1:1", "usage", str(tmp_path / "spool" / "kafka"),
                     idempotence=False, compression="none", timeout_s=0.5)
    e = _Embedded(tmp_path, sink)
    ids = [f"spooled-{i}" for i in range(30)]
    e.put(ids)
    assert await e.drainer.drain_once() == 30
    assert sink.spool.pending_bytes() > 0 and e.audit.ok
    assert await e.found(ids) == ids
    await sink.close()
    await e.close()


async def test_the_audit_store_is_trickled_unless_the_rings_fill_or_it_is_the_last_drain(
        tmp_path) -> None:
    """The drain asks the audit writer to pace a batch (AuditWriter.put) in the ordinary
    case; not when a ring is fuller than 1/FLUSH_FILL (the pace would fall behind the
    workers), and not on the last drain at shutdown."""
    from supervisor.usage_drain import FLUSH_FILL

    e = _Embedded(tmp_path)
    asked: list[bool] = []
    put = e.audit.put

    async def recorded(items, ran=None, paced=True) -> None:
        asked.append(paced)
        await put(items, ran, paced)

    e.audit.put = recorded  # type: ignore[method-assign]
    try:
        e.put(["a0", "a1"])
        assert await e.drainer.drain_once() == 2
        record = len(_record(0).replace(b'"r0"', b'"f-00000"')) + 8  # and its frame head
        n = e.drainer.capacity // FLUSH_FILL // record + 20  # over a quarter of ring 0 ...
        e.put([f"f-{i:05d}" for i in range(2 * n)])  # (put alternates the two rings)
        assert await e.drainer.drain_once() == 2 * n
        e.put(["z0"])
        await e.drainer.drain_all()
        assert asked == [True, False, False]
        assert len(await e.found(["a0", "a1", "f-00000", f"f-{2 * n - 1:05d}", "z0"])) == 5
    finally:
        await e.close()


async def test_a_stop_between_two_paced_chunks_still_stores_the_whole_batch(
        tmp_path, redis_server, monkeypatch) -> None:
    """UsageExport.stop cancels the drain and then drains what is left. A batch is consumed
    from the rings before its audit write, so a cancel that lands between two of its paced
    chunks must not cut the write short (it did: 32 of 200 records stored, no error shown)."""
    import asyncio

    from apirouter.usage_ring import RingProducer
    from supervisor import audit_writer
    from workers.audit_reader import AuditReader

    shm = create_usage_segment(segment_name(str(os.getpid()), f"t{time.monotonic_ns()}"), 2,
                               1 << 20)
    prods = [RingProducer(shm, 0), RingProducer(shm, 1)]
    spec = f"redis:{redis_server.url}"
    audit = AuditWriter(spec, 600)
    drainer = UsageDrainer(shm, str(tmp_path), JsonlSink(str(tmp_path / "spool")), audit)
    prefix = f"stop-{time.monotonic_ns()}"
    ids = [f"{prefix}-{i}" for i in range(200)]
    for n, rid in enumerate(ids):
        assert prods[n % 2].put(_record(0).replace(b'"r0"', f'"{rid}"'.encode()))
    in_gap = asyncio.Event()
    pause = audit_writer._pause

    async def watched(seconds: float) -> None:
        in_gap.set()
        await pause(seconds)

    monkeypatch.setattr(audit_writer, "_pause", watched)
    task = asyncio.ensure_future(drainer.run())
    try:
        await asyncio.wait_for(in_gap.wait(), 5)
        task.cancel()  # as UsageExport.stop does, then:
        await asyncio.gather(task, return_exceptions=True)
        await drainer.drain_all()
        assert drainer.empty() and audit.ok
        reader = AuditReader(spec)
        try:
            assert [rid for rid in ids if await reader.get(rid, "acme") is None] == []
        finally:
            reader.close()
    finally:
        task.cancel()
        drainer.close()
        await audit.close()
        for p in prods:
            p.release()
        unlink_segment(shm)
        shm.close()
