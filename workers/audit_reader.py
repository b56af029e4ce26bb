"""Reads a request's record from the audit store the supervisor writes (see apirouter.audit)."""

from __future__ import annotations

import os
import sqlite3

from apirouter.audit import SELECT, parse_store, redis_key
from apirouter.errors import RouterError
from apirouter.redis_client import RedisClient, RedisError, RedisUnavailable

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
            if not os.path.exists(self.where):
                return None  # nothing recorded yet
            self._db = sqlite3.connect(f"file:{self.where}?mode=ro", uri=True,
                                       timeout=LOOKUP_TIMEOUT_S)
        try:
            row = self._db.execute(SELECT, (request_id,)).fetchone()
        except sqlite3.Error:
            self._db.close()
            self._db = None
            raise RouterError("SERVICE_UNAVAILABLE",
                              "the local audit store cannot be read") from None
        return bytes(row[0]) if row else None

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        if self._db is not None:
            self._db.close()
