"""A worker's usage hand-off: its ring in the supervisor's usage segment, a file when full.

Once ``emit`` returns (or ``put``, and ``overflow`` when ``put`` answers False: the accounting
step calls the two itself, one Python call fewer a request), the record no longer depends on
this process: it is either in shared memory (the supervisor drains the ring, also after this
worker dies) or written into an overflow file (in the page cache: a ``kill -9`` does not lose
it). A full ring therefore never drops a record; each overflow is counted
(router_usage_ring_overflow_total) and logged once per file. Overflow files are named
``<pid>-<random>.<n>.open`` while the worker appends to them and renamed ``.ready`` on the next
heartbeat; the supervisor imports ``.ready`` files, and ``.open`` files whose worker is dead.
"Dead" is told by a flock the worker holds on its open file (taken before the file gets its
``.open`` name), not by its pid: pids mean nothing across PID namespaces, and a successor
supervisor must never take a file a live worker still writes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets

from apirouter.usage_ring import OVERFLOW_DIR, RingProducer, attach_usage_segment
from workers.metrics import USAGE_OVERFLOW

log = logging.getLogger("apirouter.worker")


class UsageOut:
    def __init__(self, segment: str, slot: int, run_dir: str) -> None:
        self._shm = attach_usage_segment(segment)
        self.ring = RingProducer(self._shm, slot)
        # The ring's C put, bound once: the accounting step calls it for every record and
        # ``overflow`` only when it answers False (the ring is full).
        self.put = self.ring.put
        self.directory = os.path.join(run_dir, OVERFLOW_DIR)
        # pid plus a random part: pids repeat across PID namespaces (containers), names must not
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._fd: int | None = None
        self._open_path = ""
        self._files = 0

    def emit(self, record: bytes) -> None:
        """Hand a record over: into the ring, or the overflow file when the ring is full."""
        if not self.put(record):
            self.overflow(record)

    def overflow(self, record: bytes) -> None:
        """Append a record the ring refused to the open overflow file (opened at need)."""
        if self._fd is None:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._files += 1
            self._open_path = os.path.join(self.directory, f"{self.tag}.{self._files}.open")
            fresh = self._open_path[:-len(".open")] + ".new"
            self._fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # held until the file is handed over
            os.rename(fresh, self._open_path)
            log.warning("usage ring full (%d bytes in use): writing records to %s",
                        self.ring.fill(), self._open_path)
        # JSON encoders escape newlines in strings, so one line is one record (a test holds it).
        os.write(self._fd, record + b"\n")
        USAGE_OVERFLOW.inc()

    def rotate(self) -> None:
        """Hand the current overflow file to the supervisor (called on each heartbeat)."""
        if self._fd is None:
            return
        try:
            os.rename(self._open_path, self._open_path[:-len(".open")] + ".ready")
        except FileNotFoundError:  # taken by a supervisor that thought it abandoned: keep on
            log.error("overflow file %s vanished before it was handed over", self._open_path)
        os.close(self._fd)
        self._fd = None

    def close(self) -> None:
        self.rotate()
        self.ring.release()
        self._shm.close()
