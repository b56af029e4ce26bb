"""Where operator overrides live, and the audit trail of every change to them.

With etcd, overrides are keys ``{prefix}/overrides/{id}`` (JSON records): the supervisor's watch
sees its own writes like anyone else's, so every router sharing the prefix applies them. Without
etcd they are kept in ``overrides.json`` in the cache directory (atomically replaced), so they
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

from supervisor.etcd_source import EtcdSource

log = logging.getLogger("apirouter.audit")

AUDIT_FILE = "audit.jsonl"
OVERRIDES_FILE = "overrides.json"


class OverrideStore:
    def __init__(self, directory: str, etcd: EtcdSource | None) -> None:
        self.directory = directory
        self.etcd = etcd
        self.records: dict[str, dict[str, Any]] = {}
        if etcd is None:
            self.records = self._load_file()

    def _key(self, override_id: str) -> bytes:
        assert self.etcd is not None
        return f"{self.etcd.prefix}/overrides/{override_id}".encode()

    def update_from_kvs(self, kvs: Mapping[bytes, bytes], prefix: str) -> None:
        base = f"{prefix.rstrip('/')}/overrides/".encode()
        records = {}
        for key, value in kvs.items():
            if key.startswith(base):
                try:
                    record = json.loads(value)
                    records[record["id"]] = record
                except (ValueError, KeyError, TypeError):
                    log.error("ignoring unreadable override at %s", key.decode("utf-8", "replace"))
        self.records = records

    async def add(self, record: dict[str, Any], actor: str) -> None:
        if self.etcd is not None:
            await self.etcd.put(self._key(record["id"]), json.dumps(record).encode())
        self.records[record["id"]] = record
        self._save_file()
        self.audit("override.set", actor, record)

    async def remove(self, override_id: str, actor: str, action: str = "override.clear") -> bool:
        record = self.records.pop(override_id, None)
        if record is None:
            return False
        if self.etcd is not None:
            await self.etcd.delete(self._key(override_id))
        self._save_file()
        self.audit(action, actor, record)
        return True

    # -- local persistence and audit ----------------------------------------------------------

    def _load_file(self) -> dict[str, dict[str, Any]]:
        try:
            with open(os.path.join(self.directory, OVERRIDES_FILE)) as f:
                data = json.load(f)
            return {r["id"]: r for r in data}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _save_file(self) -> None:
        if self.etcd is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".overrides.")
        with os.fdopen(fd, "w") as f:
            json.dump(list(self.records.values()), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.directory, OVERRIDES_FILE))

    def audit(self, action: str, actor: str, record: dict[str, Any]) -> None:
        entry = {"at": time.time(), "action": action, "actor": actor, "override": record}
        log.info("%s by %s: %s %s %s", action, actor, record.get("kind"), record.get("target"),
                 record.get("id"))
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
