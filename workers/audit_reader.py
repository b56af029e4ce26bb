"""Reads a request's record from the audit store the supervisor writes (see apirouter.audit)."""

from __future__ import annotations

import os
import sqlite3
import time

from apirouter.audit import (
    INDEX_NAME,
    SELECT_ANY,
    SELECT_ORG,
    hour_file,
    parse_store,
    redis_key,
)
from apirouter.errors import RouterError
from apirouter.redis_client import RedisClient, RedisError, RedisUnavailable
from apirouter.usage import read_item

LOOKUP_TIMEOUT_S = 1.0


class AuditReader:
    def __init__(self, spec: str, ttl_s: float | None = None) -> None:
        self.kind, self.where = parse_store(spec)
        self.ttl_s = ttl_s
        self._redis = RedisClient(self.where) if self.kind == "redis" else None
        self._db: sqlite3.Connection | None = None

    async def get(self, request_id: str, org: str | None) -> bytes | None:
        """The record of ``request_id`` made by ``org`` (None: by whichever org used the id
        first — for admins)."""
        if self._redis is not None:
            try:
                if org is None:
                    first = await self._redis.execute("GET", redis_key(request_id),
                                                      timeout=LOOKUP_TIMEOUT_S)
                    if not isinstance(first, bytes):
                        return None
                    org = first.decode()
                value = await self._redis.execute("GET", redis_key(request_id, org),
                                                  timeout=LOOKUP_TIMEOUT_S)
            except (RedisUnavailable, RedisError):
                raise RouterError("SERVICE_UNAVAILABLE",
                                  "the audit store (Redis) is not answering") from None
            return value if isinstance(value, bytes) else None
        return self._get_local(request_id, org)

    def _get_local(self, request_id: str, org: str | None) -> bytes | None:
        if self._db is None:
            index = os.path.join(self.where, INDEX_NAME)
            if not os.path.exists(index):
                return None  # nothing recorded yet
            self._db = sqlite3.connect(f"file:{index}?mode=ro", uri=True,
                                       timeout=LOOKUP_TIMEOUT_S)
        try:
            row = (self._db.execute(SELECT_ANY, (request_id,)) if org is None else
                   self._db.execute(SELECT_ORG, (request_id, org))).fetchone()
        except sqlite3.Error:
            self._db.close()
            self._db = None
            raise RouterError("SERVICE_UNAVAILABLE",
                              "the local audit store cannot be read") from None
        if row is None:
            return None
        hour, offset, length = row
        try:
            with open(hour_file(self.where, hour), "rb") as f:
                raw = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            return None  # expired between the index read and the file read
        # The data file is not fsync'd: after a crash an index row may point past its end.
        item = read_item(raw) if len(raw) == length else None
        if item is None or item.request_id != request_id:
            return None
        if self.ttl_s is not None and item.ts_end + self.ttl_s < time.time():
            return None  # expired: the hourly purge has not come round to it yet
        return raw

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._db is not None:
            self._db.close()
