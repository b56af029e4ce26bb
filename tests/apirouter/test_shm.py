from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from apirouter.shm import (
    SegmentError,
    TableReader,
    TableWriter,
    TornRead,
)
from apirouter.table import Backend, Limits, Route, RoutingTable, decode_table, encode_table
from tests.harness import ROOT


def _name(tag: str) -> str:
    return f"apirouter-{os.getpid()}-test{tag}{time.monotonic_ns() % 10**9}"


def table_for(k: int) -> bytes:
    """A table whose every field encodes k, and whose size varies with k."""
    n = 1 + k % 17
    backends = {f"b{i}": Backend(f"b{i}", "http", f"h{k}", k % 65535 + 1, f"/{k}", None, i, "")
                for i in range(n)}
    routes = {f"m{k}-{i}": Route(f"m{k}-{i}", (f"b{i}",), (k % 7 + 1,)) for i in range(n)}
    return encode_table(RoutingTable(float(k), f"gen{k}", Limits(k + 1, 1.0, 1.0, 1, 1.0, 1),
                                     backends, routes))


def consistent(table: RoutingTable) -> bool:
    k = int(table.compiled_at)
    n = 1 + k % 17
    return (table.source == f"gen{k}" and len(table.backends) == n and len(table.routes) == n
            and all(b.host == f"h{k}" and b.port == k % 65535 + 1 for b in table.backends.values())
            and all(r.model.startswith(f"m{k}-") for r in table.routes.values())
            and table.limits.max_body_bytes == k + 1)


def reader_main(name: str, stop_at: float) -> None:
    """Runs in a separate interpreter (like a gunicorn worker): prints its findings as JSON."""
    reader = TableReader(name)
    reads = bad = regressions = 0
    last = 0
    while time.time() < stop_at:
        try:
            gen, payload = reader.read()
        except TornRead:  # the writer lapped this reader: a worker keeps its last table
            continue
        table = decode_table(payload)
        reads += 1
        bad += not consistent(table)
        regressions += gen < last
        last = gen
    reader.close()
    print(json.dumps([reads, bad, regressions, last]))


def test_publish_and_read_back() -> None:
    w = TableWriter(_name("a"), 1 << 16)
    try:
        r = TableReader(w.name)
        with pytest.raises(SegmentError, match="nothing has been published"):
            r.read()
        assert w.publish(table_for(1)) == 2
        assert w.publish(table_for(2)) == 4
        gen, payload = r.read()
        assert (gen, payload) == (4, table_for(2))
        assert r.generation() == 4
        r.close()
    finally:
        w.close()


def test_oversized_payload_is_refused_and_the_old_one_stays() -> None:
    w = TableWriter(_name("b"), 4096)
    try:
        w.publish(table_for(3))
        with pytest.raises(SegmentError, match="exceeds the slot capacity"):
            w.publish(b"x" * 5000)
        r = TableReader(w.name)
        assert r.read() == (2, table_for(3))
        r.close()
    finally:
        w.close()


def test_a_writer_killed_mid_publish_leaves_the_last_table_readable_without_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The generation stays odd forever and the next slot holds half a table: readers go on
    with the last complete generation at once (they must never sleep on the event loop)."""
    w = TableWriter(_name("k"), 1 << 16)
    try:
        w.publish(table_for(1))
        w.publish(table_for(2))
        buf = w._shm.buf
        assert buf is not None
        buf[16:24] = (5).to_bytes(8, "little")  # publish of generation 6 begun ...
        slot = 32 + 16 + (1 << 16)  # ... into slot 1 (generation 6 lives there) ...
        buf[slot + 16:slot + 116] = b"\xff" * 100  # ... and killed half-way through
        monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("the reader slept"))
        r = TableReader(w.name)
        for _ in range(100):
            assert r.read() == (4, table_for(2))
        assert r.generation() == 5
        r.close()
    finally:
        w.close()


def test_foreign_or_missing_segments_are_refused() -> None:
    with pytest.raises(SegmentError, match="no shared-memory segment"):
        TableReader("apirouter-does-not-exist")


def test_readers_in_other_processes_never_see_a_torn_or_mixed_table() -> None:
    # Unrelated interpreters attaching by name, as gunicorn workers do (multiprocessing's
    # spawn would share our resource tracker, which workers do not).
    w = TableWriter(_name("c"), 1 << 16)
    try:
        w.publish(table_for(1))
        stop_at = time.time() + 4.0
        code = ("from tests.apirouter.test_shm import reader_main; "
                f"reader_main({w.name!r}, {stop_at})")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  cwd=ROOT) for _ in range(2)]
        k = 1
        while time.time() < stop_at:
            k += 1
            w.publish(table_for(k))
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=30)
            assert p.returncode == 0
            results.append(json.loads(out))
        assert k > 1000, "the writer should have published many generations"
        for reads, bad, regressions, _ in results:
            assert reads > 100
            assert bad == 0
            assert regressions == 0
        # Reader processes have exited: their resource trackers must not have unlinked it.
        r = TableReader(w.name)
        assert r.read()[0] == w.generation
        r.close()
    finally:
        w.close()
