"""Compile configs into routing tables and publish them: the table segment's only writer."""

from __future__ import annotations

import logging
import os
from typing import Any

from apirouter.config import RouterConfig
from apirouter.shm import TableWriter, segment_name
from apirouter.table import compile_table, encode_table

log = logging.getLogger("apirouter.supervisor")


class TablePublisher:
    def __init__(self, capacity: int) -> None:
        self._writer = TableWriter(segment_name(os.getpid(), "table"), capacity)
        self.segment = self._writer.name

    @property
    def generation(self) -> int:
        return self._writer.generation

    def publish(self, cfg: RouterConfig, source: str, status: dict[str, Any] | None = None) -> int:
        """Compile and publish; raises SegmentError (nothing published) if it does not fit."""
        payload = encode_table(compile_table(cfg, source=source, status=status))
        gen = self._writer.publish(payload)
        log.info("published routing table generation %d (%d backends, %d models, %d bytes)",
                 gen, len(cfg.backends), len(cfg.models), len(payload))
        return gen

    def close(self) -> None:
        self._writer.close(unlink=True)
