"""The disk spool: usage records Kafka has not taken yet, in order, checksummed, fsync'd.

A spool is a directory of segment files ``<seq>.spool`` (seq ascending = age) and a
``cursor`` file naming the first record not yet replayed (segment seq, byte offset). Every
entry is::

    u32 length | u32 crc32(appended_at + payload) | f64 appended_at | payload

``append`` writes a batch and fsyncs before returning: only then may the drainer consume the
records from the worker rings. ``read`` returns the records after the cursor in order;
``advance`` moves the cursor past them (fsync'd) and deletes segments left behind, which is
how a replayed spool is truncated. An entry whose length or checksum does not hold can only
be the torn last write of a crash (those records were never consumed from the rings, so they
come again): reading stops there, the tail of that segment is counted as corrupt and skipped.

Blocking I/O: the supervisor calls these methods in a thread, one at a time.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from dataclasses import dataclass

_ENTRY = struct.Struct("<IId")
_SUFFIX = ".spool"
SEGMENT_BYTES = 16 * 1024 * 1024
MAX_ENTRY = 16 * 1024 * 1024
_WINDOW_SLACK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Position:
    seq: int
    offset: int


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    records: list[bytes]
    end: Position  # the cursor once these records are safely elsewhere
    oldest_appended_at: float | None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: str, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.corrupt_entries = 0
        self.cursor = self._load_cursor()
        self._segments = self._list_segments()
        self._active: int | None = None  # the segment this process appends to
        if self._segments and self.cursor.seq < self._segments[0]:
            self.cursor = Position(self._segments[0], 0)

    # -- layout ------------------------------------------------------------------------------

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:012d}{_SUFFIX}")

    def _list_segments(self) -> list[int]:
        return sorted(int(n[:-len(_SUFFIX)]) for n in os.listdir(self.directory)
                      if n.endswith(_SUFFIX) and n[:-len(_SUFFIX)].isdigit())

    def _load_cursor(self) -> Position:
        try:
            with open(os.path.join(self.directory, "cursor"), encoding="utf-8") as f:
                doc = json.load(f)
            return Position(int(doc["seq"]), int(doc["offset"]))
        except (OSError, ValueError, KeyError, TypeError):
            return Position(0, 0)

    def _save_cursor(self) -> None:
        path = os.path.join(self.directory, "cursor")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"seq": self.cursor.seq, "offset": self.cursor.offset}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    # -- writing -----------------------------------------------------------------------------

    def append(self, records: list[bytes], now: float | None = None) -> None:
        if not records:
            return
        stamp = time.time() if now is None else now
        meta = struct.pack("<d", stamp)
        seed = zlib.crc32(meta)
        parts = []
        for r in records:
            parts.append(_ENTRY.pack(len(r), zlib.crc32(r, seed), stamp))
            parts.append(r)
        # Each process appends to a segment of its own making, so a torn write left by a
        # crash can only be the end of an older segment, never followed by good entries.
        new_segment = self._active is None or os.path.getsize(
            self._path(self._active)) >= self.segment_bytes
        if new_segment:
            self._active = max([*self._segments, self.cursor.seq - 1, 0]) + 1
            self._segments.append(self._active)
        assert self._active is not None
        fd = os.open(self._path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, b"".join(parts))
            os.fdatasync(fd)  # the data and the new size; not the mtime
        finally:
            os.close(fd)
        if new_segment:
            _fsync_dir(self.directory)

    # -- reading -----------------------------------------------------------------------------

    def read(self, max_records: int = 1000, max_bytes: int = 4 << 20) -> SpoolBatch:
        """The records after the cursor, in order, and where the cursor goes after them."""
        out: list[bytes] = []
        oldest: float | None = None
        taken = 0
        pos = self.cursor
        while len(out) < max_records and taken < max_bytes:
            if pos.seq not in self._segments:
                later = [s for s in self._segments if s > pos.seq]
                if not later:
                    break
                pos = Position(later[0], 0)
            size = os.path.getsize(self._path(pos.seq))
            with open(self._path(pos.seq), "rb") as f:
                f.seek(pos.offset)
                data = f.read(min(size - pos.offset, max_bytes + _WINDOW_SLACK))
                if len(data) >= _ENTRY.size:  # a first entry larger than the window: all of it
                    n = _ENTRY.unpack_from(data, 0)[0]
                    if _ENTRY.size + n > len(data) and n <= MAX_ENTRY:
                        data += f.read(min(size - pos.offset, _ENTRY.size + n) - len(data))
            i = 0
            while i + _ENTRY.size <= len(data) and len(out) < max_records and taken < max_bytes:
                n, crc, _ = _ENTRY.unpack_from(data, i)
                end = i + _ENTRY.size + n
                if n <= MAX_ENTRY and end > len(data) and pos.offset + end <= size:
                    break  # the read window ends inside this entry: the next read has it
                if n > MAX_ENTRY or end > len(data) or zlib.crc32(
                        data[i + _ENTRY.size:end], zlib.crc32(data[i + 8:i + 16])) != crc:
                    self.corrupt_entries += 1
                    i = size - pos.offset  # skip the torn tail of this segment
                    break
                out.append(data[i + _ENTRY.size:end])
                if oldest is None:
                    oldest = _ENTRY.unpack_from(data, i)[2]
                taken += n
                i = end
            if i < len(data) and i + _ENTRY.size > len(data) and pos.offset + len(data) == size:
                self.corrupt_entries += 1  # a header cut short at the end: torn too
                i = len(data)
            pos = Position(pos.seq, pos.offset + i)
            if pos.offset < size or pos.seq == self._active:
                break
            pos = Position(pos.seq + 1, 0)
        return SpoolBatch(out, pos, oldest)

    def advance(self, end: Position) -> None:
        """Consume up to ``end``; delete segments wholly behind it (the truncation)."""
        for seq in list(self._segments):
            finished = seq < end.seq or (
                seq == end.seq and end.offset >= os.path.getsize(self._path(seq)))
            if finished:
                os.unlink(self._path(seq))
                self._segments.remove(seq)
                if seq == self._active:
                    self._active = None
        self.cursor = end if self._segments else Position(max(end.seq + 1, 1), 0)
        self._save_cursor()

    # -- state -------------------------------------------------------------------------------

    def pending_bytes(self) -> int:
        total = 0
        for seq in self._segments:
            size = os.path.getsize(self._path(seq))
            total += size - self.cursor.offset if seq == self.cursor.seq else size
        return max(0, total)

    def pending_records(self, limit: int = 1_000_000) -> int:
        """Entries after the cursor, counted from their headers (at most ``limit``)."""
        count = 0
        for seq in self._segments:
            if seq < self.cursor.seq:
                continue
            offset = self.cursor.offset if seq == self.cursor.seq else 0
            with open(self._path(seq), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                while offset + _ENTRY.size <= size and count < limit:
                    head = os.pread(f.fileno(), _ENTRY.size, offset)
                    n = _ENTRY.unpack_from(head, 0)[0]
                    if n > MAX_ENTRY or offset + _ENTRY.size + n > size:
                        break  # a torn tail: read() skips it too
                    count += 1
                    offset += _ENTRY.size + n
        return count

    def empty(self) -> bool:
        return self.pending_bytes() == 0

    def oldest_appended_at(self) -> float | None:
        batch = self.read(max_records=1)
        return batch.oldest_appended_at
