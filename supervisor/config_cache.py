"""The local cache of the last good config: what the supervisor boots from when etcd is down.

One JSON file (the config document and the etcd revision it came from), replaced atomically:
written to a temporary file, fsync'd, renamed over the old one, and the directory fsync'd, so
a crash leaves either the old or the new cache, never a torn one. (The Go design used BoltDB;
a single small document needs no database.)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

CACHE_FILE = "last-good-config.json"


class ConfigCache:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, CACHE_FILE)

    def save(self, raw: dict[str, Any], revision: int,
             extra_kvs: dict[bytes, bytes] | None = None) -> None:
        """Keep ``raw`` (and other etcd keys the router needs at boot, e.g. overrides)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        kvs = {k.decode(): v.decode() for k, v in (extra_kvs or {}).items()}
        doc = json.dumps({"revision": revision, "saved_at": time.time(), "config": raw,
                          "kvs": kvs}, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".config.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(doc)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self) -> tuple[dict[str, Any], int, dict[bytes, bytes]] | None:
        """(config document, revision, extra keys), or None when there is no readable cache."""
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            kvs = {k.encode(): v.encode() for k, v in (doc.get("kvs") or {}).items()}
            return doc["config"], int(doc["revision"]), kvs
        except (OSError, ValueError, KeyError, TypeError):
            return None
