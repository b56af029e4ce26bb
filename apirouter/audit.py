"""The audit store's contract and the HTTP caching rules of the audit lookup.

The supervisor writes every usage record (denials included) to the audit store; workers read
it for ``GET /v1/audit/requests/{requestId}``. Two stores:

- ``redis:<url>``: key ``audit:<request id>`` → the record's bytes, with a TTL.
- ``local:<directory>``: records appended to hourly files ``<hour>.log`` in the directory,
  and an SQLite index (WAL, so workers read while the supervisor writes) of request id →
  (hour, offset, length) beside them: small index rows cost ~2.5 µs a record where rows
  holding the record cost ~10. Files and rows older than the TTL are dropped.

The supervisor chooses at boot (Redis when ``redis_url`` is set) and tells workers through
APIROUTER_AUDIT_STORE. Caching follows RFC 9110: a strong ETag over the selected body,
If-None-Match wins over If-Modified-Since, and a match answers 304.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

AUDIT_STORE_ENV = "APIROUTER_AUDIT_STORE"
LOCAL_DIR_NAME = "audit"
INDEX_NAME = "index.sqlite3"
CREATE_TABLE = ("CREATE TABLE IF NOT EXISTS audit (request_id TEXT PRIMARY KEY, "
                "hour INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL) "
                "WITHOUT ROWID")
INSERT = "INSERT OR IGNORE INTO audit (request_id, hour, offset, length) VALUES (?, ?, ?, ?)"
SELECT = "SELECT hour, offset, length FROM audit WHERE request_id = ?"
PURGE = "DELETE FROM audit WHERE hour < ?"


def hour_file(directory: str, hour: int) -> str:
    """The data file of records appended during ``hour`` (unix time // 3600)."""
    return os.path.join(directory, f"{hour}.log")
MAX_REQUEST_ID = 128


def redis_key(request_id: str) -> str:
    return f"audit:{request_id}"


def parse_store(spec: str) -> tuple[str, str]:
    kind, _, where = spec.partition(":")
    if kind not in ("redis", "local") or not where:
        raise ValueError(f"{AUDIT_STORE_ENV} must be redis:<url> or local:<directory>, "
                         f"got {spec!r}")
    return kind, where


def etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(ts), UTC), usegmt=True)


def _etag_matches(header: str, tag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison for If-None-Match: W/"x" matches "x".
    return any(t.strip().removeprefix("W/") == tag for t in header.split(","))


def not_modified(if_none_match: str | None, if_modified_since: str | None, tag: str,
                 last_modified: float) -> bool:
    if if_none_match is not None:
        return _etag_matches(if_none_match, tag)
    if if_modified_since is not None:
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False
        return int(last_modified) <= since.timestamp()
    return False
