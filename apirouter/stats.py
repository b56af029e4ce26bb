"""The stats segment: one record per worker slot, written only by the worker holding the slot.

Byte layout (little endian, 8-byte words)::

    header  0   8  magic b"APIRSTA\\x01"
            8   4  layout version u32
            12  4  slots u32
            16  4  backends u32 (B)
            20 12  reserved
    slot i at 32 + i * (8 * (4 + 4B)):
      word 0          pid u64 (0: never claimed)
      word 1          heartbeat, unix seconds f64
      word 2          claimed at, unix seconds f64
      word 3          reserved
      words 4..       in-flight u64[B], successes u64[B], failures u64[B], latency EWMA ms f64[B]

Backends are addressed by ``Backend.index``, which the supervisor keeps stable across reloads.
A worker claims a slot by taking an exclusive ``flock`` on ``slots/<i>.lock`` in the run
directory: the kernel releases it if the worker dies, so a replacement reuses the slot. Counters
are monotonic except when a slot is re-claimed (they restart at zero); readers treat a drop as
a restart. The supervisor reads every slot for outlier detection and worker liveness.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from dataclasses import dataclass
from itertools import compress
from multiprocessing import resource_tracker, shared_memory

from apirouter.shm import SegmentError, open_segment

MAGIC = b"APIRSTA\x01"
LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sIII")
_HEADER_SIZE = 32
_SLOT_WORDS = 4
STATS_SEGMENT_ENV = "APIROUTER_STATS_SHM"
RUN_DIR_ENV = "APIROUTER_RUN_DIR"
EWMA_ALPHA = 0.2


def slot_size(backends: int) -> int:
    return 8 * (_SLOT_WORDS + 4 * backends)


def segment_size(slots: int, backends: int) -> int:
    return _HEADER_SIZE + slots * slot_size(backends)


def _buf(shm: shared_memory.SharedMemory) -> memoryview:
    if shm.buf is None:
        raise SegmentError(f"segment {shm.name!r} is closed")
    return shm.buf


def create_stats_segment(name: str, slots: int, backends: int) -> shared_memory.SharedMemory:
    """Create the segment, or take over the one a previous supervisor of this instance left
    (its workers may still be writing their slots). Untracked: the creator unlinks it."""
    shm, created = open_segment(name, segment_size(slots, backends))
    buf = _buf(shm)
    if created:
        buf[:_HEADER_SIZE] = _HEADER.pack(MAGIC, LAYOUT_VERSION, slots, backends).ljust(
            _HEADER_SIZE, b"\0")
    elif _HEADER.unpack(buf[:_HEADER.size]) != (MAGIC, LAYOUT_VERSION, slots, backends):
        shm.close()
        raise SegmentError(f"segment {name!r} exists with another layout")
    return shm


def attach(name: str) -> tuple[shared_memory.SharedMemory, int, int]:
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        raise SegmentError(f"no shared-memory segment {name!r}") from None
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    magic, layout, slots, backends = _HEADER.unpack_from(_buf(shm), 0)
    if magic != MAGIC or layout != LAYOUT_VERSION:
        shm.close()
        raise SegmentError(f"segment {name!r} is not a stats segment of layout {LAYOUT_VERSION}")
    return shm, slots, backends


class WorkerStats:
    """A worker's own slot: counters it bumps per attempt, and its heartbeat."""

    def __init__(self, name: str, run_dir: str) -> None:
        self._shm, slots, self.backends = attach(name)
        self._lock_fd, self.slot = _claim(run_dir, slots)
        start = _HEADER_SIZE + self.slot * slot_size(self.backends)
        region = _buf(self._shm)[start:start + slot_size(self.backends)]
        region[:] = bytes(len(region))
        self._u64 = region.cast("Q")
        self._f64 = region.cast("d")
        b = self.backends
        ok0, fail0, lat0 = _SLOT_WORDS + b, _SLOT_WORDS + 2 * b, _SLOT_WORDS + 3 * b
        # The slot's arrays as views of their own, each indexable by Backend.index: the
        # in-flight counters (what least_inflight reads) and the latency EWMAs (what the
        # latency strategy reads) are public; an attempt's begin and end index them directly
        # (no offset added a write: ~10 bytecodes an attempt fewer).
        self.inflight = self._u64[_SLOT_WORDS:ok0]
        self._successes = self._u64[ok0:fail0]
        self._failures = self._u64[fail0:lat0]
        self.latency_ms = self._f64[lat0:lat0 + b]
        now = time.time()
        self._u64[0] = os.getpid()
        self._f64[1] = now
        self._f64[2] = now

    def begin(self, index: int) -> None:
        self.inflight[index] += 1

    def end(self, index: int, ok: bool, latency_ms: float) -> None:
        # ``abandon``'s decrement written out here: once a proxied request, and the call
        # between cost more than the decrement itself.
        inflight = self.inflight
        if inflight[index]:
            inflight[index] -= 1
        if ok:
            self._successes[index] += 1
            lat = self.latency_ms
            old = lat[index]
            lat[index] = latency_ms if old == 0.0 else old + EWMA_ALPHA * (latency_ms - old)
        else:
            self._failures[index] += 1

    def abandon(self, index: int) -> None:
        """An attempt that ended without a verdict on the backend (the client hung up): it is
        no longer in flight, and counts neither as a success nor as a failure."""
        inflight = self.inflight
        if inflight[index]:
            inflight[index] -= 1

    def heartbeat(self) -> None:
        self._f64[1] = time.time()

    def close(self) -> None:
        for view in (self.inflight, self._successes, self._failures, self.latency_ms, self._u64,
                     self._f64):
            view.release()
        self._shm.close()
        os.close(self._lock_fd)


def _claim(run_dir: str, slots: int) -> tuple[int, int]:
    lock_dir = os.path.join(run_dir, "slots")
    os.makedirs(lock_dir, exist_ok=True)
    for i in range(slots):
        fd = os.open(os.path.join(lock_dir, f"{i}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, i
    raise SegmentError(f"all {slots} worker stats slots are taken")


@dataclass(frozen=True, slots=True)
class SlotView:
    """One claimed slot as read at one instant. The arrays (indexed by Backend.index) are
    read-only views of that copy: the supervisor reads a few of their B entries, ten times
    a second, and making tuples of all of them cost ~15 µs a slot."""

    slot: int
    pid: int
    heartbeat: float
    inflight: memoryview[int]
    successes: memoryview[int]
    failures: memoryview[int]
    latency_ms: memoryview[float]


class StatsReader:
    """The supervisor's view of every slot (it created the segment: no tracker games here)."""

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self._shm = shm
        _, _, self.slots, self.backends = _HEADER.unpack_from(_buf(shm), 0)

    def read(self) -> list[SlotView]:
        buf = _buf(self._shm)
        b = self.backends
        size = slot_size(b)
        # Every slot's pid word through one strided view of the segment as 8-byte words
        # (each an aligned 8-byte load, as the worker's own store is): ~2 µs for 128 slots
        # where a loop unpacking them cost ~50, most of an idle supervisor's 10 reads a second.
        pids = buf[:segment_size(self.slots, b)].cast("Q")[_HEADER_SIZE // 8::size // 8].tolist()
        out = []
        for i in compress(range(self.slots), pids):  # never claimed (pid 0): no copy
            start = _HEADER_SIZE + i * size
            raw = bytes(buf[start:start + size])
            u = memoryview(raw).cast("Q")
            f = memoryview(raw).cast("d")
            w = _SLOT_WORDS
            out.append(SlotView(i, u[0], f[1], u[w:w + b], u[w + b:w + 2 * b],
                                u[w + 2 * b:w + 3 * b], f[w + 3 * b:w + 4 * b]))
        return out
