"""Publish routing tables: the table segment's only writer."""

from __future__ import annotations

import logging

from apirouter.shm import TableWriter
from apirouter.table import RoutingTable, encode_table

log = logging.getLogger("apirouter.supervisor")


class TablePublisher:
    def __init__(self, segment: str, capacity: int) -> None:
        self._writer = TableWriter(segment, capacity)
        self.segment = self._writer.name

    @property
    def generation(self) -> int:
        return self._writer.generation

    def publish(self, table: RoutingTable) -> int:
        """Encode and publish; raises SegmentError (nothing published) if it does not fit."""
        payload = encode_table(table)
        gen = self._writer.publish(payload)
        log.debug("published routing table generation %d (%d backends, %d models, %d bytes, "
                  "%d not healthy)", gen, len(table.backends), len(table.routes), len(payload),
                  len(table.health))
        return gen

    def close(self) -> None:
        self._writer.close(remove=True)
