"""Records operators manage one at a time — overrides, API keys — and the audit trail of changes.

With etcd, a record is the key ``{prefix}/{section}/{id}`` (JSON): the supervisor's watch sees
its own writes like anyone else's, so every router sharing the prefix applies them. Without
etcd they are kept in ``{section}.json`` in the cache directory (replaced atomically), so they
survive a restart. Every change is appended to ``audit.jsonl`` (who, what, when) and logged.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from supervisor.etcd_source import EtcdSource

log = logging.getLogger("apirouter.audit")

AUDIT_FILE = "audit.jsonl"
# Fields never written to the audit trail.
_SECRET_FIELDS = ("sha256",)


class RecordStore:
    def __init__(self, section: str, directory: str, etcd: EtcdSource | None) -> None:
        self.section = section
        self.directory = directory
        self.etcd = etcd
        self.records: dict[str, dict[str, Any]] = {}
        if etcd is None:
            self.records = self._load_file()

    @property
    def _file(self) -> str:
        return os.path.join(self.directory, f"{self.section}.json")

    def _key(self, record_id: str) -> bytes:
        assert self.etcd is not None
        return f"{self.etcd.prefix}/{self.section}/{quote(record_id, safe='')}".encode()

    def update_from_kvs(self, kvs: Mapping[bytes, bytes], prefix: str) -> None:
        base = f"{prefix.rstrip('/')}/{self.section}/".encode()
        records = {}
        for key, value in kvs.items():
            if key.startswith(base):
                try:
                    records[unquote(key[len(base):].decode())] = json.loads(value)
                except ValueError:
                    log.error("ignoring unreadable record at %s", key.decode("utf-8", "replace"))
        self.records = records

    async def add(self, record_id: str, record: dict[str, Any], actor: str,
                  action: str) -> None:
        if self.etcd is not None:
            await self.etcd.put(self._key(record_id), json.dumps(record).encode())
        self.records[record_id] = record
        self._save_file()
        self.audit(action, actor, record_id, record)

    async def remove(self, record_id: str, actor: str, action: str) -> bool:
        record = self.records.pop(record_id, None)
        if record is None:
            return False
        if self.etcd is not None:
            await self.etcd.delete(self._key(record_id))
        self._save_file()
        self.audit(action, actor, record_id, record)
        return True

    # -- local persistence and audit ----------------------------------------------------------

    def _load_file(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self._file) as f:
                data = json.load(f)
            return {str(k): v for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_file(self) -> None:
        if self.etcd is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.section}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.records, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file)

    def audit(self, action: str, actor: str, record_id: str, record: dict[str, Any]) -> None:
        shown = {k: v for k, v in record.items() if k not in _SECRET_FIELDS}
        entry = {"at": time.time(), "action": action, "actor": actor, "id": record_id,
                 "record": shown}
        log.info("%s %s by %s", action, record_id, actor)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with open(os.path.join(self.directory, AUDIT_FILE), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def recent_audit(self, limit: int = 100) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self.directory, AUDIT_FILE)) as f:
                lines = f.readlines()[-limit:]
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]
