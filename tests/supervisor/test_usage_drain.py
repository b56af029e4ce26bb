"""Hand-off without sockets: worker producer → ring/overflow file → drainer → JSONL sink."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jsonschema

from apirouter.shm import segment_name
from apirouter.usage import schema, usage_record
from apirouter.usage_ring import create_usage_segment, unlink_segment
from supervisor.audit_writer import AuditWriter
from supervisor.usage_drain import UsageDrainer, recover_abandoned
from supervisor.usage_jsonl import JsonlSink
from tests.harness import ROOT
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
    shm = create_usage_segment(segment_name(os.getpid(), f"t{time.monotonic_ns()}"), 2, 65536)
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


async def test_rings_of_a_supervisor_killed_with_sigkill_are_recovered(tmp_path) -> None:
    """A process creates a usage segment, a 'worker' writes into it, and it dies by SIGKILL:
    the next supervisor drains that segment into its sink, then unlinks it."""
    code = (
        "import os, signal, time\n"
        "from apirouter.shm import segment_name\n"
        "from apirouter.usage_ring import create_usage_segment, RingProducer\n"
        "from apirouter.usage import usage_record\n"
        "shm = create_usage_segment(segment_name(os.getpid(), 'usage'), 4, 65536)\n"
        "p = RingProducer(shm, 2)\n"
        "for i in range(40):\n"
        "    assert p.put(usage_record(kind='denial', request_id=f'dead-{i}', ts_start=1.0,\n"
        "        ts_end=2.0, endpoint='/v1/inference', key_id='k', org='o', model='m',\n"
        "        backend_id=None, decision_type=None, attempts=0, status=429,\n"
        "        error_code='RATE_LIMIT_EXCEEDED', prompt_tokens=None, completion_tokens=None,\n"
        "        cost_micro=0, backend_s=0.0, table_generation=1, worker_pid=1,\n"
        "        limit='key_rpm', retry_after_s=1))\n"
        "print(shm.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9
    name = proc.stdout.strip()
    time.sleep(0.2)  # the dead process's resource tracker notices its exit
    assert os.path.exists(f"/dev/shm/{name}")  # untracked: the crash did not unlink it
    sink = JsonlSink(str(tmp_path / "spool"))
    recovered = await recover_abandoned(sink, None, str(tmp_path))
    assert recovered >= 40
    ids = {r["request_id"] for r in _lines(str(tmp_path / "spool"))}
    assert {f"dead-{i}" for i in range(40)} <= ids
    assert not os.path.exists(f"/dev/shm/{name}")


async def test_a_corrupt_ring_is_quarantined_and_the_others_drain(tmp_path) -> None:
    """A frame whose checksum fails is retried, then the rest of its ring is kept in the
    quarantine directory (never silently skipped); the other rings are not held up."""
    from apirouter.usage_ring import RingProducer
    from supervisor import metrics

    shm = create_usage_segment(segment_name(os.getpid(), f"t{time.monotonic_ns()}"), 2, 65536)
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
