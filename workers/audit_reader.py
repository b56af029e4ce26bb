"""Reads a request's record from the audit store the supervisor writes (see apirouter.audit)."""

from __future__ import annotations

import os
import sqlite3

from apirouter.audit import INDEX_NAME, SELECT, hour_file, parse_store, redis_key
from apirouter.errors import RouterError
from apirouter.redis_client import RedisClient, RedisError, RedisUnavailable
from apirouter.usage import read_item

LOOKUP_TIMEOUT_S = 1.0


class AuditReader:
    def __init__(self, spec: str) -> None:
        self.kind, self.where = parse_store(spec)
        self._redis = RedisClient(self.where) if self.kind == "redis" else None
        self._db: sqlite3.Connection | None = None

    async def get(self, request_id: str) -> bytes | None:
        if self._redis is not None:
            try:
                value = await self._redis.execute("GET", redis_key(request_id),
                                                  timeout=LOOKUP_TIMEOUT_S)
            except (RedisUnavailable, RedisError):
                raise RouterError("SERVICE_UNAVAILABLE",
                                  "the audit store (Redis) is not answering") from None
            return value if isinstance(value, bytes) else None
        return self._get_local(request_id)

    def _get_local(self, request_id: str) -> bytes | None:
        if self._db is None:
            index = os.path.join(self.where, INDEX_NAME)
            if not os.path.exists(index):
                return None  # nothing recorded yet
            self._db = sqlite3.connect(f"file:{index}?mode=ro", uri=True,
                                       timeout=LOOKUP_TIMEOUT_S)
        try:
            row = self._db.execute(SELECT, (request_id,)).fetchone()
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
        return raw if item is not None and item.request_id == request_id else None

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._db is not None:
            self._db.close()
