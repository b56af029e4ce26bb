"""Hand-off without sockets: worker producer → ring/overflow file → drainer → JSONL sink."""

from __future__ import annotations

import json
import os
import time

import jsonschema

from apirouter.shm import segment_name
from apirouter.usage import schema, usage_record
from apirouter.usage_ring import create_usage_segment, unlink_segment
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
