"""The table segment: one writer (the supervisor) publishes encoded tables to many readers.

Byte layout (little endian)::

    0   8  magic            b"APIRTBL\\x01"
    8   4  layout version   u32 (LAYOUT_VERSION)
    12  4  slot capacity    u32, bytes of payload one slot holds
    16  8  generation       u64 seqlock: odd while a publish is in progress
    24  8  reserved
    32     slot 0: [len u32][crc32 u32][generation u64][payload ... capacity]
    32+16+capacity  slot 1: same

Generation 2k (k >= 1) lives in slot k % 2. The writer bumps the generation to odd, fills the
*other* slot, then bumps it to the next even number; readers of the current slot are never
disturbed, and a reader arriving mid-publish reads the previous generation from its slot (it
never waits: a writer killed mid-publish leaves the generation odd forever, and readers go on
with the last complete table). A reader that is slow enough for the writer to come round to
its slot again sees the generation change (or the checksum fail) and retries. So a reader never
returns a torn or mixed table, and the per-request cost of "has it changed?" is one 8-byte
read.

Python 3.11's resource tracker unlinks a segment when any attaching process exits; every
process unregisters right after creating or attaching (``track=False`` only exists from 3.13):
a supervisor killed with SIGKILL must leave its segments to its workers and its successor.

Segments are named ``apirouter-<instance>-<kind>``; the instance id belongs to the run directory
(apirouter.runstate), so a restarted supervisor finds its predecessor's segments by name in any
PID namespace, and no router ever touches another instance's segments.
"""

from __future__ import annotations

import _posixshmem
import logging
import struct
import zlib
from multiprocessing import resource_tracker, shared_memory

MAGIC = b"APIRTBL\x01"
LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sII")  # magic, layout version, capacity
_GEN_OFFSET = 16
_SLOTS_OFFSET = 32
_SLOT_HEADER = struct.Struct("<IIQ")  # length, crc32, generation
_U64 = struct.Struct("<Q")
SEGMENT_PREFIX = "apirouter-"
log = logging.getLogger("apirouter.supervisor")
# How the supervisor tells workers which segment to attach.
TABLE_SEGMENT_ENV = "APIROUTER_TABLE_SHM"


class SegmentError(RuntimeError):
    """The segment is missing, foreign, of another layout, or a payload does not fit."""


class TornRead(SegmentError):
    """A consistent snapshot could not be read within the retry budget."""


def segment_name(instance: str, kind: str) -> str:
    return f"{SEGMENT_PREFIX}{instance}-{kind}"


def open_segment(name: str, size: int) -> tuple[shared_memory.SharedMemory, bool]:
    """Attach to segment ``name`` or create it (``size`` bytes); untracked either way. Returns
    the segment and whether it was created."""
    try:
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        created = True
    except FileExistsError:
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:  # unlinked in between: try once more
            shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        created = False
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm, created


def unlink(name: str) -> None:
    """Unlink an untracked segment by name (SharedMemory.unlink would also unregister it)."""
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _slot_offset(capacity: int, slot: int) -> int:
    return _SLOTS_OFFSET + slot * (_SLOT_HEADER.size + capacity)


def _buffer(shm: shared_memory.SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # only after close()
        raise SegmentError(f"segment {shm.name!r} is closed")
    return buf


def segment_size(capacity: int) -> int:
    return _slot_offset(capacity, 2)


class TableWriter:
    """Publishes payloads into the segment: exactly one live writer per segment. A writer that
    finds the segment left by its predecessor (a supervisor restart) takes it over and goes on
    from its last complete generation, so workers still reading it never notice."""

    def __init__(self, name: str, capacity: int) -> None:
        self._shm, created = open_segment(name, segment_size(capacity))
        self.name = name
        buf = _buffer(self._shm)
        if not created:
            magic, layout, had = _HEADER.unpack(buf[0:_HEADER.size])
            if magic != MAGIC or layout != LAYOUT_VERSION:
                self._shm.close()
                raise SegmentError(f"segment {name!r} exists and is not a routing-table "
                                   f"segment of layout {LAYOUT_VERSION}")
            if had != capacity:
                log.warning("table segment %s keeps its slot capacity of %d bytes (%d asked): "
                            "workers still read it", name, had, capacity)
            self.capacity = had
            g = int(_U64.unpack(buf[_GEN_OFFSET:_GEN_OFFSET + 8])[0])
            self._generation = g - (g & 1)  # a publish cut short by a kill is abandoned
            return
        self.capacity = capacity
        buf[0:_HEADER.size] = _HEADER.pack(MAGIC, LAYOUT_VERSION, capacity)
        buf[_GEN_OFFSET:_GEN_OFFSET + 8] = _U64.pack(0)
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def publish(self, payload: bytes) -> int:
        """Publish ``payload`` as the next generation and return that generation."""
        if len(payload) > self.capacity:
            raise SegmentError(
                f"table of {len(payload)} bytes exceeds the slot capacity of {self.capacity}")
        buf = _buffer(self._shm)
        nxt = self._generation + 2
        off = _slot_offset(self.capacity, (nxt // 2) % 2)
        buf[_GEN_OFFSET:_GEN_OFFSET + 8] = _U64.pack(self._generation + 1)
        start = off + _SLOT_HEADER.size
        buf[start:start + len(payload)] = payload
        buf[off:start] = _SLOT_HEADER.pack(len(payload), zlib.crc32(payload), nxt)
        buf[_GEN_OFFSET:_GEN_OFFSET + 8] = _U64.pack(nxt)
        self._generation = nxt
        return nxt

    def close(self, remove: bool = True) -> None:
        self._shm.close()
        if remove:
            unlink(self.name)


class TableReader:
    """Attaches to a segment by name and reads the current payload consistently."""

    def __init__(self, name: str) -> None:
        try:
            self._shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise SegmentError(f"no shared-memory segment {name!r}") from None
        # Readers must never unlink the writer's segment when they exit.
        resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
        buf = _buffer(self._shm)
        magic, layout, capacity = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            self._shm.close()
            raise SegmentError(f"segment {name!r} is not a routing-table segment")
        if layout != LAYOUT_VERSION:
            self._shm.close()
            raise SegmentError(f"segment layout {layout}, this reader understands {LAYOUT_VERSION}")
        self.name = name
        self.capacity = capacity
        # A u64 view of the generation word: reading it is one index, no struct call.
        self._gen = buf[_GEN_OFFSET:_GEN_OFFSET + 8].cast("Q")

    def generation(self) -> int:
        """The published generation (odd while a publish is in progress)."""
        return int(self._gen[0])

    def read(self, retries: int = 8) -> tuple[int, bytes]:
        """Return (generation, payload) of the latest completed snapshot, without waiting.

        While a publish is in progress (odd generation g) the writer fills the other slot, so
        generation g - 1 is read from its own slot undisturbed. Only a writer that completes a
        publish *and* starts the next one during this read can disturb it (the slot's
        generation or checksum then says so): that retries a few times, never sleeps, and
        raises TornRead for the caller to keep its last good table."""
        buf = _buffer(self._shm)
        for _ in range(retries):
            g1 = int(self._gen[0])
            target = g1 - (g1 & 1)
            if target == 0:
                raise SegmentError("nothing has been published yet")
            off = _slot_offset(self.capacity, (target // 2) % 2)
            length, crc, slot_gen = _SLOT_HEADER.unpack(buf[off:off + _SLOT_HEADER.size])
            if slot_gen != target or length > self.capacity:
                continue
            start = off + _SLOT_HEADER.size
            payload = bytes(buf[start:start + length])
            if self._gen[0] - target <= 1 and zlib.crc32(payload) == crc:
                return target, payload
        raise TornRead(f"no consistent snapshot after {retries} attempts")

    def close(self) -> None:
        self._gen.release()
        self._shm.close()
