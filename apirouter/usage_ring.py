"""The usage segment: one single-producer/single-consumer byte ring per worker slot.

The supervisor creates the segment, so what a worker has written outlives the worker (a
``kill -9`` included). A worker produces into the ring of the stats slot it claimed (one flock
claims both); the supervisor is the only consumer of every ring.

Byte layout (little endian)::

    header  0   8  magic b"APIRUSG\\x02"
            8   4  layout version u32
            12  4  slots u32
            16  4  capacity u32 (data bytes per ring)
            20 44  reserved
    slot i at 64 + i * (128 + capacity):
      +0    head u64   bytes ever produced (written only by the producer)
      +64   tail u64   bytes ever consumed (written only by the consumer)
      +128  data[capacity]

A record at ``head % capacity`` is a frame: u32 length, u32 crc32 of the payload, the payload.
When a frame does not fit before the end of the data area the producer writes a WRAP length
(if a frame header fits) and continues at offset 0; the consumer skips the same way. The
producer copies the frame first and only then stores the new head: a producer killed half-way
leaves head where it was, so a torn record is never seen, and its successor in the slot simply
continues from head. Both indices only grow, so ``head - tail`` is the fill level.

The indices are live memory read by another process at any moment, so each is read and written
as one aligned 8-byte word (a ``Q`` element of a cast memoryview: one load, one store).
``struct.pack_into`` must never touch them: it zeroes the bytes, then writes them one by one,
and a reader in between sees a tail of 0 (a spurious "ring full") or a head behind the tail.
(x86-64 keeps stores in program order; a weakly ordered CPU would need a fence before the head
store.) A frame whose length or checksum is wrong raises ``RingCorrupt`` at its position: the
drainer retries it and then quarantines the rest of that ring, never skipping it silently.

The per-record loops run in C (apirouter/_ringcore.c, built by setup.py): the producer's
``put``, and the consumer's cutting and checking of frames (``scan``). Each keeps its Python
reference here (``RingProducer.put_py``, ``_scan_py``), held equal to it by property tests.
"""

from __future__ import annotations

import _posixshmem
import struct
import zlib
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from operator import sub

from apirouter._ringcore import Producer, scan
from apirouter.shm import SegmentError, open_segment

try:  # the same CRC-32 as zlib's, with ISA-L's SIMD code: ~65 ns for a 500-byte record, not ~320
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # a virtualenv made before isal was a dependency (tools/setup.sh adds it)
    _fast_crc32 = zlib.crc32

MAGIC = b"APIRUSG\x02"
LAYOUT_VERSION = 2
USAGE_SEGMENT_ENV = "APIROUTER_USAGE_SHM"
OVERFLOW_DIR = "usage-overflow"  # in the run directory: records a full ring could not take
_HEADER = struct.Struct("<8sIII")
_HEADER_SIZE = 64
_SLOT_META = 128
_TAIL_OFFSET = 64
_LEN = struct.Struct("<I")
_FRAME = struct.Struct("<II")  # length, crc32
WRAP = 0xFFFFFFFF


def segment_size(slots: int, capacity: int) -> int:
    return _HEADER_SIZE + slots * (_SLOT_META + capacity)


def max_record(capacity: int) -> int:
    """The largest record a ring takes; a larger one goes to the overflow file."""
    return capacity // 4


def _buf(shm: shared_memory.SharedMemory) -> memoryview:
    if shm.buf is None:
        raise SegmentError(f"segment {shm.name!r} is closed")
    return shm.buf


def create_usage_segment(name: str, slots: int, capacity: int) -> shared_memory.SharedMemory:
    """Create the segment, untracked: Python's resource tracker would unlink it when the
    creator dies, records and all. The creator unlinks it (``unlink_segment``) once drained."""
    shm, created = open_usage_segment(name, slots, capacity)
    if not created:
        shm.close()
        raise SegmentError(f"usage segment {name!r} already exists")
    return shm


def open_usage_segment(name: str, slots: int,
                       capacity: int) -> tuple[shared_memory.SharedMemory, bool]:
    """Attach to the usage segment a previous supervisor of this instance left (its records
    are still in it, and its workers may still be writing) or create it. Returns the segment
    and whether it was created; an existing one of another layout raises SegmentError."""
    if capacity < 4096:
        raise SegmentError("a usage ring needs at least 4096 bytes")
    shm, created = open_segment(name, segment_size(slots, capacity))
    if created:
        _buf(shm)[:_HEADER_SIZE] = _HEADER.pack(MAGIC, LAYOUT_VERSION, slots, capacity).ljust(
            _HEADER_SIZE, b"\0")
        return shm, True
    try:
        read_header(shm)
    except SegmentError:
        shm.close()
        raise
    return shm, False


def read_header(shm: shared_memory.SharedMemory) -> tuple[int, int]:
    magic, layout, slots, capacity = _HEADER.unpack_from(_buf(shm), 0)
    if magic != MAGIC or layout != LAYOUT_VERSION:
        raise SegmentError(f"segment {shm.name!r} is not a usage segment of layout "
                           f"{LAYOUT_VERSION}")
    return slots, capacity


def attach_usage_segment(name: str) -> shared_memory.SharedMemory:
    """Attach by name, keeping this process's resource tracker from unlinking the segment
    when it exits (Python 3.11 has no track=False)."""
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        raise SegmentError(f"no shared-memory segment {name!r}") from None
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        read_header(shm)
    except SegmentError:
        shm.close()
        raise
    return shm


def unlink_segment(shm: shared_memory.SharedMemory) -> None:
    """Unlink an untracked segment (SharedMemory.unlink would also unregister it)."""
    _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]


class RingCorrupt(SegmentError):
    """A frame (or the indices) of one ring cannot be trusted; ``tail`` is where it starts."""

    def __init__(self, message: str, tail: int, head: int) -> None:
        super().__init__(message)
        self.tail = tail
        self.head = head


class _Ring:
    """Views of one slot's indices and data. Views are released by ``release`` so the
    segment can be closed (an exported memoryview pins the mapping)."""

    def __init__(self, shm: shared_memory.SharedMemory, slot: int) -> None:
        slots, self.capacity = read_header(shm)
        if not 0 <= slot < slots:
            raise SegmentError(f"usage slot {slot} out of range (0..{slots - 1})")
        self.slot = slot
        start = _HEADER_SIZE + slot * (_SLOT_META + self.capacity)
        buf = _buf(shm)
        self._meta = buf[start:start + _SLOT_META]
        self._idx = self._meta.cast("Q")  # [0] head, [8] tail: whole aligned words
        self._data = buf[start + _SLOT_META:start + _SLOT_META + self.capacity]
        self._start = start

    @property
    def head(self) -> int:
        return int(self._idx[0])

    @property
    def tail(self) -> int:
        return int(self._idx[_TAIL_OFFSET // 8])

    def fill(self) -> int:
        """Bytes written and not yet consumed."""
        return self.head - self.tail

    def release(self) -> None:
        self._idx.release()
        self._meta.release()
        self._data.release()


# The indices are u64 words: a head that would pass 2**64 (584 years at 1 GB/s: only a corrupt
# segment holds one) refuses the record, which goes to the worker's overflow file.
_INDEX_END = 1 << 64


class RingProducer(_Ring):
    """A worker's end: ``put`` copies a record in, or says the ring is full.

    ``put`` is the C producer's (apirouter/_ringcore.c): one call where ``put_py``, the
    reference it is held equal to (tests/apirouter/test_usage_ring.py), ran ~88 bytecodes, a
    struct pack, a bytes concatenation and a slice store a record."""

    put: Callable[[bytes], bool]

    def __init__(self, shm: shared_memory.SharedMemory, slot: int) -> None:
        super().__init__(shm, slot)
        self._slot_view = _buf(shm)[self._start:self._start + _SLOT_META + self.capacity]
        self._core = Producer(self._slot_view, self.capacity, _fast_crc32)
        self.put = self._core.put

    def put_py(self, record: bytes) -> bool:
        n = len(record)
        cap = self.capacity
        if n > max_record(cap):
            return False
        idx = self._idx
        head = idx[0]
        pos = head % cap
        room_to_end = cap - pos
        frame = _FRAME.size + n
        skip = room_to_end if room_to_end < frame else 0
        if (head - idx[_TAIL_OFFSET // 8]) + skip + frame > cap:
            return False
        if head + skip + frame >= _INDEX_END:  # only a corrupt segment's head gets there
            return False
        data = self._data
        if skip:
            if room_to_end >= _FRAME.size:
                data[pos:pos + 4] = _LEN.pack(WRAP)
            pos = 0
        data[pos:pos + frame] = _FRAME.pack(n, _fast_crc32(record)) + record
        idx[0] = head + skip + frame  # one aligned store publishes the frame
        return True

    def release(self) -> None:
        self._core.release()
        self._slot_view.release()
        super().release()


_SCAN_STOP, _SCAN_WRAP, _SCAN_BAD = 0, 1, 2  # why a scan stopped (apirouter/_ringcore.c)


def _scan_py(span: bytes, at: int, stop: int, limit: int, crc32: Callable[[bytes], int],
             out: list[bytes]) -> tuple[int, int]:
    """The reference of ``scan`` (apirouter/_ringcore.c), which peek uses: the frames of
    ``span`` that start before ``stop`` (a frame header fits wherever one starts), checked
    (length at most ``limit``, within the span, checksum) and their records appended to
    ``out``; returns where it stopped and why (_SCAN_STOP, _SCAN_WRAP, _SCAN_BAD: at ``at``)."""
    size = len(span)
    hdr = _FRAME.size
    while at < stop:
        n, crc = _FRAME.unpack_from(span, at)
        if n == WRAP:
            return at, _SCAN_WRAP
        end = at + hdr + n
        record = span[at + hdr:end]
        if n > limit or end > size or crc32(record) != crc:
            return at, _SCAN_BAD
        out.append(record)
        at = end
    return at, _SCAN_STOP


class RingConsumer(_Ring):
    """The supervisor's end: ``peek`` copies records out without consuming them; ``commit``
    consumes up to a position once they are safe elsewhere (at-least-once hand-off)."""

    def peek(self, max_bytes: int = 1 << 20, pause: Callable[[], None] | None = None,
             pause_every: int = 64 << 10) -> tuple[list[bytes], int]:
        """Records from the tail on, and the position after them: frames are taken while fewer
        than ``max_bytes`` of them (headers included) have been. A bad frame ends the batch
        before it; met first, it raises RingCorrupt (the caller retries, then quarantines).
        ``pause`` is called after every ``pause_every`` bytes of frames checked (the drain
        gives way to other processes there: supervisor.give_way).

        The unread bytes up to the end of the data area are copied out in one piece and the
        frames are cut from that copy (a copy and a view per frame cost ~0.4 µs more)."""
        cap = self.capacity
        idx = self._idx
        tail = idx[_TAIL_OFFSET // 8]
        head = idx[0]
        if head - tail > cap or head < tail:
            raise RingCorrupt(f"usage ring {self.slot}: indices are inconsistent (head {head}, "
                              f"tail {tail}, capacity {cap})", tail, head)
        out: list[bytes] = []
        taken = 0
        limit = max_record(cap)
        crc32 = _fast_crc32
        hdr = _FRAME.size
        while tail < head and taken < max_bytes:
            pos = tail % cap
            if cap - pos < hdr:
                tail += cap - pos
                continue
            # Frames never straddle the end of the data area (the producer wraps them), so
            # this span holds whole frames up to the end or to head.
            span = bytes(self._data[pos:min(cap, pos + head - tail)])
            size = len(span)
            # A frame starts at ``at`` while its header fits in the span and fewer than
            # max_bytes have been taken. ``scan`` (C) checks and cuts the frames up to the
            # next pause: a peek cost ~0.19 µs a 500-byte record where the frame loop in
            # Python (_scan_py, its reference) cost ~0.83.
            stop = min(size - hdr + 1, max_bytes - taken)
            at = 0  # tail is pos + at in the span: advanced once the span is done with
            while True:
                at, why = scan(span, at, stop if pause is None
                               else min(stop, at + max(1, pause_every)),
                               limit, crc32, out)
                if why != _SCAN_STOP or at >= stop:
                    break
                assert pause is not None
                pause()
            if why == _SCAN_WRAP and tail + cap - pos >= head:
                # A producer writes the frame that did not fit right after its WRAP: a WRAP
                # with nothing after it is a corrupt length, not a skip past what is unread.
                why = _SCAN_BAD
            if why == _SCAN_BAD:
                tail += at
                if out:
                    return out, tail
                n = _LEN.unpack_from(span, at)[0]
                raise RingCorrupt(f"usage ring {self.slot}: bad frame at {tail} (length "
                                  f"{n}, {head - tail} bytes unread)", tail, head)
            taken += at
            if why == _SCAN_WRAP:
                tail += cap - pos  # the rest of the data area is skipped
                continue
            tail += at
            if at < size and taken < max_bytes and pos + size < cap:
                # Fewer bytes than a frame header before head: a frame the indices cut.
                if out:
                    return out, tail
                raise RingCorrupt(f"usage ring {self.slot}: bad frame at {tail} (a "
                                  f"{size - at}-byte stub before head)", tail, head)
            # at head, at the end of the data area, or max_bytes taken
        return out, tail

    def unread(self, tail: int, head: int) -> bytes:
        """The raw bytes between two positions (what a quarantine keeps)."""
        cap = self.capacity
        size = max(0, min(head - tail, cap))
        pos = tail % cap
        first = bytes(self._data[pos:pos + size])
        return first + bytes(self._data[:size - len(first)])

    def commit(self, position: int) -> None:
        self._idx[_TAIL_OFFSET // 8] = position


def fill_levels(rings: list[RingConsumer]) -> list[int]:
    """Every ring's fill (``head - tail``) in one pass: the drainer checks all of them (one per
    worker slot, 128) every poll, and ``fill()`` through the properties costs ~0.9 µs a ring."""
    return [i[0] - i[_TAIL_OFFSET // 8] for i in [r._idx for r in rings]]


class RingFills:
    """The fill of every ring of a segment (``fill_levels`` of all its slots, in slot order),
    for the drainer's check of all of them every poll.

    All heads, then all tails, are read through two strided slices of one view of the segment
    as 8-byte words, each element one aligned 8-byte load as the rings' own indices are (a
    head only grows; the tail is the consumer's own): ~4.5 µs for 128 rings where the loop
    over the rings costs ~21. A capacity that is not a multiple of 8 leaves the slots off the
    words' grid: then it reads ring by ring."""

    def __init__(self, shm: shared_memory.SharedMemory, rings: list[RingConsumer]) -> None:
        slots, capacity = read_header(shm)
        if [r.slot for r in rings] != list(range(slots)):
            raise ValueError("RingFills needs the segment's rings, in slot order")
        self._rings = rings
        self._views: list[memoryview] = []
        stride = _SLOT_META + capacity
        if stride % 8 == 0:
            words = _buf(shm)[:segment_size(slots, capacity)].cast("Q")
            step, first = stride // 8, _HEADER_SIZE // 8
            self._views = [words, words[first::step], words[first + _TAIL_OFFSET // 8::step]]

    def levels(self) -> list[int]:
        if not self._views:
            return fill_levels(self._rings)
        _, heads, tails = self._views
        return list(map(sub, heads.tolist(), tails.tolist()))

    def release(self) -> None:
        for view in reversed(self._views):
            view.release()
        self._views = []
