from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.shm import SegmentError
from apirouter.usage_ring import (
    RingConsumer,
    RingProducer,
    attach_usage_segment,
    create_usage_segment,
    max_record,
    unlink_segment,
)
from tests.harness import ROOT


def _name() -> str:
    return f"apirouter-{os.getpid()}-testusage{time.monotonic_ns() % 10**9}"


@pytest.fixture
def segment():
    shm = create_usage_segment(_name(), 4, 4096)
    yield shm
    shm.close()
    unlink_segment(shm)


def test_records_come_out_in_order_across_wraps(segment) -> None:
    prod, cons = RingProducer(segment, 2), RingConsumer(segment, 2)
    sent, got = [], []
    for i in range(2000):
        rec = (b"r%d-" % i) * (1 + i % 37)
        while not prod.put(rec):  # full: the consumer frees room, nothing is dropped
            batch, pos = cons.peek()
            got.extend(batch)
            cons.commit(pos)
        sent.append(rec)
    batch, pos = cons.peek()
    got.extend(batch)
    cons.commit(pos)
    assert got == sent
    assert prod.fill() == 0
    for end in (prod, cons):
        end.release()


def test_peek_without_commit_redelivers(segment) -> None:
    prod, cons = RingProducer(segment, 0), RingConsumer(segment, 0)
    assert prod.put(b"a") and prod.put(b"b")
    assert cons.peek()[0] == [b"a", b"b"]
    assert cons.peek()[0] == [b"a", b"b"]  # not committed: still there (at-least-once)
    batch, pos = cons.peek(max_bytes=1)
    assert batch == [b"a"]
    cons.commit(pos)
    assert cons.peek()[0] == [b"b"]
    prod.release()
    cons.release()


def test_full_ring_refuses_and_oversized_records_are_refused(segment) -> None:
    prod = RingProducer(segment, 1)
    assert not prod.put(b"x" * (max_record(4096) + 1))
    n = 0
    while prod.put(b"y" * 100):
        n += 1
    assert 35 <= n <= 40  # 4096 bytes / 104 per record
    prod.release()


def test_slots_are_independent_and_bounds_checked(segment) -> None:
    a, b = RingProducer(segment, 0), RingProducer(segment, 3)
    a.put(b"for-a")
    b.put(b"for-b")
    ca, cb = RingConsumer(segment, 0), RingConsumer(segment, 3)
    assert ca.peek()[0] == [b"for-a"] and cb.peek()[0] == [b"for-b"]
    with pytest.raises(SegmentError):
        RingProducer(segment, 4)
    for r in (a, b, ca, cb):
        r.release()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=900), max_size=60),
       st.integers(min_value=1, max_value=5))
def test_any_interleaving_delivers_everything_once(records, drain_every) -> None:
    shm = create_usage_segment(_name(), 1, 4096)
    try:
        prod, cons = RingProducer(shm, 0), RingConsumer(shm, 0)
        got: list[bytes] = []
        for i, rec in enumerate(records):
            while not prod.put(rec):
                batch, pos = cons.peek()
                got.extend(batch)
                cons.commit(pos)
            if i % drain_every == 0:
                batch, pos = cons.peek(max_bytes=1500)
                got.extend(batch)
                cons.commit(pos)
        while True:
            batch, pos = cons.peek()
            if not batch:
                break
            got.extend(batch)
            cons.commit(pos)
        assert got == records
        prod.release()
        cons.release()
    finally:
        shm.close()
        unlink_segment(shm)


def test_records_survive_a_producer_killed_with_sigkill(segment) -> None:
    """A separate process writes 500 records and is SIGKILLed; every one is readable."""
    code = (
        "import os, signal, sys\n"
        "from apirouter.usage_ring import RingProducer, attach_usage_segment\n"
        f"shm = attach_usage_segment({segment.name!r})\n"
        "p = RingProducer(shm, 1)\n"
        "for i in range(30):\n"
        "    assert p.put(b'rec-%d' % i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == -9
    # The killed process's tracker must not have unlinked the segment.
    again = attach_usage_segment(segment.name)
    cons = RingConsumer(again, 1)
    assert cons.peek()[0] == [b"rec-%d" % i for i in range(30)]
    cons.release()
    again.close()
