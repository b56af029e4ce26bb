from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apirouter.shm import SegmentError
from apirouter.usage_ring import (
    _FRAME,
    WRAP,
    RingConsumer,
    RingCorrupt,
    RingFills,
    RingProducer,
    attach_usage_segment,
    create_usage_segment,
    fill_levels,
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


def _reference_peek(cons: RingConsumer, max_bytes: int) -> tuple[list[bytes], int]:
    """peek as it was written first, a frame at a time from the live view: the
    specification the one-copy peek is held to."""
    cap, idx, data = cons.capacity, cons._idx, cons._data
    tail, head = idx[8], idx[0]
    if head - tail > cap or head < tail:
        raise RingCorrupt("indices", tail, head)
    out: list[bytes] = []
    taken = 0
    while tail < head and taken < max_bytes:
        pos = tail % cap
        if cap - pos < _FRAME.size:
            tail += cap - pos
            continue
        n, crc = _FRAME.unpack(data[pos:pos + _FRAME.size])
        if n == WRAP:
            tail += cap - pos
            continue
        end = pos + _FRAME.size + n
        record = bytes(data[pos + _FRAME.size:end]) if n <= max_record(cap) and end <= cap \
            else None
        if record is None or tail + _FRAME.size + n > head or zlib.crc32(record) != crc:
            if out:
                break
            raise RingCorrupt("frame", tail, head)
        out.append(record)
        tail += _FRAME.size + n
        taken += _FRAME.size + n  # max_bytes bounds the frames, headers included
    return out, tail


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=1000), min_size=1, max_size=40),
       st.integers(min_value=0, max_value=39), st.integers(min_value=1, max_value=5000),
       st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))))
def test_peek_matches_the_frame_by_frame_reading(records, consumed, max_bytes, flip) -> None:
    """Across wraps, with a limit, and with any one byte of the unread data flipped, the
    one-copy peek returns what the frame-by-frame reading returns, or fails at the same
    place."""
    shm = create_usage_segment(_name(), 1, 4096)
    try:
        prod, cons = RingProducer(shm, 0), RingConsumer(shm, 0)
        for i, rec in enumerate(records):
            while not prod.put(rec):
                cons.commit(cons.peek()[1])
            if i == consumed:
                cons.commit(cons.peek()[1])
        if flip is not None and cons.fill():
            at, mask = flip
            pos = (cons.tail + at % cons.fill()) % cons.capacity
            cons._data[pos] ^= mask
        try:
            expected: object = _reference_peek(cons, max_bytes)
        except RingCorrupt as e:
            expected = ("corrupt", e.tail, e.head)
        try:
            got: object = cons.peek(max_bytes)
        except RingCorrupt as e:
            got = ("corrupt", e.tail, e.head)
        prod.release()
        cons.release()
        assert got == expected
    finally:
        unlink_segment(shm)  # first: a failing example must not leave its segment behind
        shm.close()


def test_a_frame_cut_short_by_head_is_corrupt_not_skipped(segment) -> None:
    prod, cons = RingProducer(segment, 0), RingConsumer(segment, 0)
    assert prod.put(b"a" * 100) and prod.put(b"b" * 100)
    prod._idx[0] = 108 + 4  # head inside the second frame's header
    batch, pos = cons.peek()
    assert (batch, pos) == ([b"a" * 100], 108)  # the sound frame before it is delivered
    cons.commit(pos)
    with pytest.raises(RingCorrupt) as e:
        cons.peek()
    assert (e.value.tail, e.value.head) == (108, 112)
    prod.release()
    cons.release()


def test_a_wrap_with_nothing_after_it_is_corrupt_not_a_skip(segment) -> None:
    # A producer writes the frame that did not fit right after its WRAP; a WRAP length met
    # mid-lap, with head before the end of the data area, is a corrupt frame: the peek must
    # not skip to the next lap, past head (the unread records would go without quarantine).
    prod, cons = RingProducer(segment, 0), RingConsumer(segment, 0)
    for i in range(5):
        assert prod.put(b"r%d" % i * 20)  # 48-byte frames
    cons._data[96:100] = struct.pack("<I", WRAP)  # the third frame's length
    batch, pos = cons.peek()
    assert (batch, pos) == ([b"r0" * 20, b"r1" * 20], 96)
    cons.commit(pos)
    with pytest.raises(RingCorrupt) as e:
        cons.peek()
    assert (e.value.tail, e.value.head) == (96, 240)
    prod.release()
    cons.release()


def test_fill_levels_reads_every_ring(segment) -> None:
    rings = [RingConsumer(segment, i) for i in range(4)]
    prods = [RingProducer(segment, i) for i in range(4)]
    assert prods[1].put(b"x" * 10) and prods[3].put(b"y" * 30) and prods[3].put(b"z")
    assert fill_levels(rings) == [r.fill() for r in rings] == [0, 18, 0, 47]
    rings[3].commit(rings[3].peek()[1])
    assert fill_levels(rings) == [0, 18, 0, 0]
    for r in rings + prods:
        r.release()


@pytest.mark.parametrize("capacity", [4096, 4100])  # on the 8-byte grid, and off it
def test_ring_fills_reads_what_fill_levels_reads(capacity) -> None:
    shm = create_usage_segment(_name(), 5, capacity)
    rings = [RingConsumer(shm, i) for i in range(5)]
    prods = [RingProducer(shm, i) for i in range(5)]
    fills = RingFills(shm, rings)
    assert fills.levels() == [0] * 5
    assert prods[0].put(b"a") and prods[2].put(b"x" * 10) and prods[4].put(b"y" * 30)
    assert fills.levels() == fill_levels(rings) == [9, 0, 18, 0, 38]
    rings[2].commit(rings[2].peek()[1])
    while prods[4].put(b"z" * 200):
        pass
    assert fills.levels() == fill_levels(rings) == [9, 0, 0, 0, rings[4].fill()]
    with pytest.raises(ValueError):
        RingFills(shm, rings[1:])
    fills.release()
    for r in rings + prods:
        r.release()
    shm.close()  # no view of the segment is left behind
    unlink_segment(shm)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_the_readers_crc32_is_the_producers(data: bytes) -> None:
    """The reader checks frames with ISA-L's CRC-32; the producer writes zlib's."""
    from apirouter import usage_ring

    assert usage_ring._fast_crc32 is not zlib.crc32  # isal is installed: the fast one is tested
    assert usage_ring._fast_crc32(data) == zlib.crc32(data)


def _ring_state(ring: RingProducer) -> tuple[int, int, bytes]:
    return ring.head, ring.tail, bytes(ring._data)


# One step of a producer's life: a record to put, or a consumer committing some of the unread
# bytes (a whole number of frames, as the drain does: peek up to a limit, commit).
_PUT = st.tuples(st.just("put"), st.binary(max_size=1100))  # > max_record(4096) included
_COMMIT = st.tuples(st.just("commit"), st.integers(min_value=1, max_value=4096))


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=0, max_value=4096),
       st.lists(st.one_of(_PUT, _PUT, _COMMIT), max_size=80),
       st.sampled_from([4096, 4100, 4103]))
def test_the_c_put_writes_what_the_python_put_writes(start, off, steps, capacity) -> None:
    """Two rings, one fed by the C ``put`` and one by ``put_py`` (the reference), from the
    same indices through the same records and commits: after every step both answered alike
    and hold the same indices and data bytes, through wrap-arounds (any start position,
    including less than a frame header before the end), a full ring, oversized records, and
    capacities off the 8-byte grid."""
    shm = create_usage_segment(_name(), 2, capacity)
    try:
        c, py = RingProducer(shm, 0), RingProducer(shm, 1)
        conss = [RingConsumer(shm, 0), RingConsumer(shm, 1)]
        head = start + off
        for ring in (c, py):
            ring._idx[0] = head
            ring._idx[8] = head
        for op, arg in steps:
            if op == "put":
                assert c.put(arg) == py.put_py(arg)
            else:
                for cons in conss:
                    cons.commit(cons.peek(max_bytes=arg)[1])
            assert _ring_state(c) == _ring_state(py)
        for r in (c, py, *conss):
            r.release()
    finally:
        unlink_segment(shm)
        shm.close()


def _put_both(head: int, tail: int, record: bytes, capacity: int) -> None:
    """The C put and the reference on rings with these indices: the same answer, the same
    ring bytes and indices after."""
    shm = create_usage_segment(_name(), 2, capacity)
    try:
        c, py = RingProducer(shm, 0), RingProducer(shm, 1)
        for ring in (c, py):
            ring._idx[0] = head
            ring._idx[8] = tail
        assert c.put(record) == py.put_py(record)
        assert _ring_state(c) == _ring_state(py)
        for r in (c, py):
            r.release()
    finally:
        unlink_segment(shm)
        shm.close()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=-5000, max_value=5000),
       st.binary(max_size=1100), st.sampled_from([4096, 4100]))
def test_the_c_put_treats_any_indices_as_the_python_put_does(head, behind, record,
                                                             capacity) -> None:
    """Inconsistent indices (a tail ahead of the head, or more unread than the capacity):
    the C put refuses or writes exactly as the reference does."""
    _put_both(head, max(0, head - behind), record, capacity)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 64) - 1),
       st.integers(min_value=0, max_value=(1 << 64) - 1), st.binary(max_size=1100))
@example(head=(1 << 63) + 100, tail=0, record=b"x")
@example(head=(1 << 64) - 1, tail=0, record=b"x")
@example(head=0, tail=(1 << 64) - 1, record=b"x")
def test_the_c_put_treats_indices_far_apart_as_the_python_put_does(head, tail,
                                                                   record) -> None:
    """Indices a corrupt segment could hold, however far apart (the fill check overflowed 64
    bits in C): the C put refuses or writes exactly as the reference does."""
    _put_both(head, tail, record, 4096)


def test_the_c_put_takes_any_buffer_and_lets_go_of_the_segment(segment) -> None:
    prod, cons = RingProducer(segment, 0), RingConsumer(segment, 0)
    assert prod.put(bytearray(b"ab")) and prod.put(memoryview(b"cd"))
    assert cons.peek()[0] == [b"ab", b"cd"]
    with pytest.raises(TypeError):
        prod.put("text")  # type: ignore[arg-type]
    prod.release()
    with pytest.raises(ValueError):
        prod.put(b"after release")
    cons.release()


def _frames(records: list[bytes]) -> bytes:
    return b"".join(_FRAME.pack(len(r), zlib.crc32(r)) + r for r in records)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12),
       st.one_of(st.none(), st.tuples(st.integers(min_value=0), st.integers(1, 255))),
       st.one_of(st.none(), st.integers(min_value=0)), st.integers(0, 4000),
       st.integers(0, 400), st.binary(max_size=12))
def test_the_c_scan_reads_what_the_python_scan_reads(records, flip, wrap_at, stop, limit,
                                                     tail) -> None:
    """``scan`` (C), which peek cuts frames with, against ``_scan_py``, its reference: the
    same records, position and reason on any bytes — sound frames, a WRAP, a flipped byte
    (bad length, bad checksum), frames longer than the limit or than the span."""
    from apirouter.usage_ring import _fast_crc32, _scan_py, scan

    span = bytearray(_frames(records) + tail)
    if wrap_at is not None and span:
        at = wrap_at % len(span)
        span[at:at + 4] = _FRAME.pack(WRAP, 0)[:4]
    if flip is not None and span:
        span[flip[0] % len(span)] ^= flip[1]
    data = bytes(span)
    stop = min(stop, len(data) - _FRAME.size + 1)
    for at in {0, *(len(_frames(records[:i])) for i in range(len(records)))}:
        if at >= len(data) - _FRAME.size + 1:
            continue
        c_out: list[bytes] = []
        py_out: list[bytes] = []
        assert scan(data, at, stop, limit, _fast_crc32, c_out) == \
            _scan_py(data, at, stop, limit, _fast_crc32, py_out)
        assert c_out == py_out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=700), min_size=1, max_size=30),
       st.integers(min_value=1, max_value=3000), st.integers(1, 5000))
def test_peek_gives_way_every_pause_every_bytes(records, pause_every, max_bytes) -> None:
    """The drain's pauses: peek calls ``pause`` once every ``pause_every`` bytes of frames
    checked (as the frame-by-frame loop did), and returns what it returns without pauses."""
    shm = create_usage_segment(_name(), 1, 4096)
    try:
        prod, cons = RingProducer(shm, 0), RingConsumer(shm, 0)
        for rec in records:
            if not prod.put(rec):
                break
        marks: list[int] = []
        got = cons.peek(max_bytes, pause=lambda: marks.append(0), pause_every=pause_every)
        assert got == cons.peek(max_bytes)
        # the reference count: a pause before each frame starting at or past the next mark
        # (counted from the start of the span, then from the frame it paused at)
        expected, mark, at = 0, pause_every, 0
        size = got[1] - cons.tail
        for rec in got[0]:
            if at >= mark:
                expected += 1
                mark = at + pause_every
            at += _FRAME.size + len(rec)
        assert at == size and len(marks) == expected
        prod.release()
        cons.release()
    finally:
        unlink_segment(shm)
        shm.close()
