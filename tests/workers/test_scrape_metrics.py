"""Scrape-time gauges are read at most once a second per worker for one table."""

from __future__ import annotations

from typing import Any

import pytest

from workers import scrape_metrics


async def test_scrapes_within_a_second_share_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Any] = []
    clock = [100.0]

    async def read(admission: Any, table: Any) -> bytes:
        reads.append(table)
        return f"gauges {len(reads)}\n".encode()

    monkeypatch.setattr(scrape_metrics, "_read", read)
    monkeypatch.setattr(scrape_metrics, "_last", None)
    monkeypatch.setattr(scrape_metrics.time, "monotonic", lambda: clock[0])
    table, newer = object(), object()
    assert await scrape_metrics.scrape_exposition(None, table) == b"gauges 1\n"
    clock[0] += 0.5
    assert await scrape_metrics.scrape_exposition(None, table) == b"gauges 1\n"
    assert await scrape_metrics.scrape_exposition(None, newer) == b"gauges 2\n"
    clock[0] += 1.0
    assert await scrape_metrics.scrape_exposition(None, newer) == b"gauges 3\n"
    assert len(reads) == 3
