"""The audit store's contract and the HTTP caching rules of the audit lookup.

The supervisor writes every usage record (denials included) to the audit store; workers read
it for ``GET /v1/audit/requests/{requestId}``. Two stores:

- ``redis:<url>``: key ``audit:rec:<len(org)>:<org>:<request id>`` → the record's bytes, with
  a TTL, and ``audit:first:<request id>`` → the org that used the id first (admin lookups).
- ``local:<directory>``: records appended to hourly files ``<hour>.log`` in the directory,
  and an SQLite index (WAL, so workers read while the supervisor writes) of (request id, org)
  → (hour, offset, length) beside them: small index rows cost ~2.5 µs a record where rows
  holding the record cost ~10. Files and rows older than the TTL are dropped, and a lookup
  never returns a record older than the TTL (APIROUTER_AUDIT_TTL_S) in between.

Request ids may be chosen by clients (X-Request-ID), so records are keyed by org as well: an
id another org used first cannot hide an org's own record from it.

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
AUDIT_TTL_ENV = "APIROUTER_AUDIT_TTL_S"
LOCAL_DIR_NAME = "audit"
INDEX_NAME = "index.sqlite3"
CREATE_TABLE = ("CREATE TABLE IF NOT EXISTS audit_by_org (request_id TEXT NOT NULL, "
                "org TEXT NOT NULL, hour INTEGER NOT NULL, offset INTEGER NOT NULL, "
                "length INTEGER NOT NULL, PRIMARY KEY (request_id, org)) WITHOUT ROWID")
INSERT = ("INSERT OR IGNORE INTO audit_by_org (request_id, org, hour, offset, length) "
          "VALUES (?, ?, ?, ?, ?)")
SELECT_ORG = ("SELECT hour, offset, length FROM audit_by_org WHERE request_id = ? AND org = ?")
SELECT_ANY = ("SELECT hour, offset, length FROM audit_by_org WHERE request_id = ? "
              "ORDER BY hour LIMIT 1")
PURGE = "DELETE FROM audit_by_org WHERE hour < ?"


def hour_file(directory: str, hour: int) -> str:
    """The data file of records appended during ``hour`` (unix time // 3600)."""
    return os.path.join(directory, f"{hour}.log")
MAX_REQUEST_ID = 128


def redis_key(request_id: str, org: str | None = None) -> str:
    """The record of ``request_id`` made by ``org``; without org, the id's first org.

    The two kinds of key have their own prefixes and the org is length-prefixed: request ids
    may contain ':', and ``audit:<org>:<id>`` / ``audit:<id>`` let org B's id ``A:x`` name
    org A's record of ``x`` (B's pointer then blocked A's record and broke A's lookups)."""
    if org is None:
        return f"audit:first:{request_id}"
    return f"audit:rec:{len(org)}:{org}:{request_id}"


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
