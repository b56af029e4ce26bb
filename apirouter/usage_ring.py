"""The usage segment: one single-producer/single-consumer byte ring per worker slot.

The supervisor creates the segment, so what a worker has written outlives the worker (a
``kill -9`` included). A worker produces into the ring of the stats slot it claimed (one flock
claims both); the supervisor is the only consumer of every ring.

Byte layout (little endian)::

    header  0   8  magic b"APIRUSG\\x01"
            8   4  layout version u32
            12  4  slots u32
            16  4  capacity u32 (data bytes per ring)
            20 44  reserved
    slot i at 64 + i * (128 + capacity):
      +0    head u64   bytes ever produced (written only by the producer)
      +64   tail u64   bytes ever consumed (written only by the consumer)
      +128  data[capacity]

A record at ``head % capacity`` is a u32 length then that many bytes. When a record does not
fit before the end of the data area the producer writes a WRAP length (if four bytes remain)
and continues at offset 0; the consumer skips the same way. The producer copies the record
first and only then stores the new head (one aligned 8-byte store): a producer killed half-way
leaves head where it was, so a torn record is never seen, and its successor in the slot simply
continues from head. Both indices only grow, so ``head - tail`` is the fill level. (x86-64
keeps stores in program order; a weakly ordered CPU would need a fence before the head store.)
"""

from __future__ import annotations

import _posixshmem
import struct
from multiprocessing import resource_tracker, shared_memory

from apirouter.shm import SegmentError

MAGIC = b"APIRUSG\x01"
LAYOUT_VERSION = 1
USAGE_SEGMENT_ENV = "APIROUTER_USAGE_SHM"
OVERFLOW_DIR = "usage-overflow"  # in the run directory: records a full ring could not take
_HEADER = struct.Struct("<8sIII")
_HEADER_SIZE = 64
_SLOT_META = 128
_TAIL_OFFSET = 64
_LEN = struct.Struct("<I")
_U64 = struct.Struct("<Q")
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
    creator dies, records and all. The creator unlinks it (``unlink_segment``) once drained;
    after a crash the next supervisor drains and unlinks it."""
    if capacity < 4096:
        raise SegmentError("a usage ring needs at least 4096 bytes")
    shm = shared_memory.SharedMemory(name=name, create=True, size=segment_size(slots, capacity))
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    buf = _buf(shm)
    buf[:_HEADER_SIZE] = bytes(_HEADER_SIZE)
    _HEADER.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, slots, capacity)
    return shm


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


class _Ring:
    """Views of one slot's indices and data. Views are released by ``release`` so the
    segment can be closed (an exported memoryview pins the mapping)."""

    def __init__(self, shm: shared_memory.SharedMemory, slot: int) -> None:
        slots, self.capacity = read_header(shm)
        if not 0 <= slot < slots:
            raise SegmentError(f"usage slot {slot} out of range (0..{slots - 1})")
        start = _HEADER_SIZE + slot * (_SLOT_META + self.capacity)
        buf = _buf(shm)
        self._meta = buf[start:start + _SLOT_META]
        self._data = buf[start + _SLOT_META:start + _SLOT_META + self.capacity]

    @property
    def head(self) -> int:
        return int(_U64.unpack_from(self._meta, 0)[0])

    @property
    def tail(self) -> int:
        return int(_U64.unpack_from(self._meta, _TAIL_OFFSET)[0])

    def fill(self) -> int:
        """Bytes written and not yet consumed."""
        return self.head - self.tail

    def release(self) -> None:
        self._meta.release()
        self._data.release()


class RingProducer(_Ring):
    """A worker's end: ``put`` copies a record in, or says the ring is full."""

    def put(self, record: bytes) -> bool:
        n = len(record)
        cap = self.capacity
        if n > max_record(cap):
            return False
        head = self.head
        pos = head % cap
        room_to_end = cap - pos
        skip = room_to_end if room_to_end < 4 + n else 0
        if (head - self.tail) + skip + 4 + n > cap:
            return False
        data = self._data
        if skip:
            if room_to_end >= 4:
                _LEN.pack_into(data, pos, WRAP)
            pos = 0
        _LEN.pack_into(data, pos, n)
        data[pos + 4:pos + 4 + n] = record
        _U64.pack_into(self._meta, 0, head + skip + 4 + n)
        return True


class RingConsumer(_Ring):
    """The supervisor's end: ``peek`` copies records out without consuming them; ``commit``
    consumes up to a position once they are safe elsewhere (at-least-once hand-off)."""

    def peek(self, max_bytes: int = 1 << 20) -> tuple[list[bytes], int]:
        cap = self.capacity
        tail, head = self.tail, self.head
        if head - tail > cap or head < tail:
            raise SegmentError(f"usage ring indices are inconsistent (head {head}, "
                               f"tail {tail}, capacity {cap})")
        data = self._data
        out: list[bytes] = []
        taken = 0
        while tail < head and taken < max_bytes:
            pos = tail % cap
            if cap - pos < 4:
                tail += cap - pos
                continue
            (n,) = _LEN.unpack_from(data, pos)
            if n == WRAP:
                tail += cap - pos
                continue
            out.append(bytes(data[pos + 4:pos + 4 + n]))
            tail += 4 + n
            taken += n
        return out, tail

    def commit(self, position: int) -> None:
        _U64.pack_into(self._meta, _TAIL_OFFSET, position)
