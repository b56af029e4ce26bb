"""The embedded usage sink: one JSONL file per UTC day in the spool directory.

Each batch is appended and fsync'd before ``accept`` returns, so the drainer only consumes
records from the worker rings once they are on disk. Files are ``usage-YYYYMMDD.jsonl``, one
record per line, exactly the bytes the worker encoded, in the file of the record's UTC day
(of its ``ts_end``; one the calendar cannot name: the day it is written).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from apirouter.usage import UsageItem
from supervisor import metrics

# End times a day file can be named after (years 1 to 9999). A record whose end time is
# outside (a parsable but absurd number: JSON has no limit) is filed under the day it is
# written: time.gmtime would raise on it, and the batch, retried forever, would hold every
# ring's records back.
FIRST_TS = -62135596800.0
END_TS = 253402300800.0


class JsonlSink:
    kind = "jsonl"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.last_error: str | None = None

    def path_for(self, when: float) -> str:
        return os.path.join(self.directory, time.strftime("usage-%Y%m%d.jsonl", time.gmtime(when)))

    def _append(self, items: list[UsageItem],
                then: Callable[[bytes | None], None] | None) -> None:
        by_day: dict[int, list[bytes]] = {}  # integer days: strftime per record cost ~1 µs
        ends = [item.ts_end for item in items]
        one_day = bool(ends and FIRST_TS <= min(ends) and max(ends) < END_TS
                   and int(min(ends) // 86400) == int(max(ends) // 86400))
        lines = None
        if one_day:  # the usual batch
            by_day[int(ends[0] // 86400)] = [item.raw for item in items]
        else:
            today = int(time.time() // 86400)
            for item in items:
                ts = item.ts_end
                day = int(ts // 86400) if FIRST_TS <= ts < END_TS else today
                by_day.setdefault(day, []).append(item.raw)
        for day, raws in by_day.items():
            raws.append(b"")  # the last line's newline, joined in (not a copy of the batch)
            fd = os.open(self.path_for(day * 86400), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                         0o600)
            lines = b"\n".join(raws)
            try:
                os.write(fd, lines)
                os.fdatasync(fd)  # the data and the new size; not the mtime
            finally:
                os.close(fd)
        if then is not None:
            # The audit store's hour file takes the same lines: one join of the batch, not
            # two (a join cost ~0.6 µs a record under load at c=32).
            then(lines if one_day else None)

    async def start(self) -> None:
        metrics.USAGE_SINK_UP.set(1)

    async def accept(self, items: list[UsageItem],
                     then: Callable[[bytes | None], None] | None = None) -> None:
        """Append and fsync the batch on a worker thread; ``then`` (the local audit store's
        write, which never raises) runs on that thread once the batch is durable, given the
        batch's lines as written (when they went to one file): one trip to a thread per
        batch instead of two (a trip costs ~0.3 µs a record at 9,000/s)."""
        try:
            await asyncio.to_thread(self._append, items, then)
        except OSError as e:
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            metrics.USAGE_SINK_ERRORS.labels("jsonl").inc()
            raise
        self.last_error = None
        metrics.USAGE_PUBLISHED.inc(len(items))

    def replay_now(self) -> None:
        return None  # JSONL files are the destination: nothing waits to be replayed

    async def refresh_gauges(self) -> None:
        metrics.USAGE_SPOOL_BYTES.set(0)
        metrics.USAGE_SPOOL_RECORDS.set(0)
        metrics.USAGE_SPOOL_AGE.set(0)

    def status(self) -> dict[str, Any]:
        return {"status": "ok" if self.last_error is None else "degraded", "kind": self.kind,
                "directory": self.directory, "last_error": self.last_error}

    async def close(self) -> None:
        return None
