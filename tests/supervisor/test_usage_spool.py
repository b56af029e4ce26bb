from __future__ import annotations

import os

from supervisor.usage_spool import Spool


def _drain(spool: Spool, max_records: int = 1000) -> list[bytes]:
    out = []
    while True:
        batch = spool.read(max_records=max_records)
        if not batch.records:
            spool.advance(batch.end)
            return out
        out.extend(batch.records)
        spool.advance(batch.end)


def test_append_read_advance_in_order_across_segments(tmp_path) -> None:
    spool = Spool(str(tmp_path), segment_bytes=1000)
    sent = [b"record-%04d" % i * 3 for i in range(300)]
    for i in range(0, 300, 7):
        spool.append(sent[i:i + 7], now=1000.0 + i)
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".spool")]) > 5
    assert spool.oldest_appended_at() == 1000.0
    assert _drain(spool, max_records=13) == sent
    assert spool.empty() and spool.pending_bytes() == 0
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".spool")]  # truncated


def test_a_new_process_resumes_at_the_cursor(tmp_path) -> None:
    first = Spool(str(tmp_path))
    first.append([b"a", b"b", b"c"])
    batch = first.read(max_records=2)
    assert batch.records == [b"a", b"b"]
    first.advance(batch.end)
    second = Spool(str(tmp_path))  # e.g. the supervisor restarted
    second.append([b"d"])
    assert _drain(second) == [b"c", b"d"]


def test_a_torn_tail_is_skipped_and_counted(tmp_path) -> None:
    first = Spool(str(tmp_path))
    first.append([b"good-1", b"good-2"])
    seg = [n for n in os.listdir(tmp_path) if n.endswith(".spool")][0]
    with open(tmp_path / seg, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # a crash in the middle of a write
    second = Spool(str(tmp_path))
    second.append([b"after"])
    assert _drain(second) == [b"good-1", b"good-2", b"after"]
    assert second.corrupt_entries == 1


def test_a_flipped_bit_is_detected(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    spool.append([b"x" * 50, b"y" * 50])
    seg = tmp_path / [n for n in os.listdir(tmp_path) if n.endswith(".spool")][0]
    raw = bytearray(seg.read_bytes())
    raw[20] ^= 0x01  # inside the first payload
    seg.write_bytes(bytes(raw))
    fresh = Spool(str(tmp_path))
    assert _drain(fresh) == []
    assert fresh.corrupt_entries == 1


def test_entries_larger_than_the_read_window(tmp_path) -> None:
    spool = Spool(str(tmp_path))
    big = [bytes([65 + i]) * (200_000 + i) for i in range(5)]
    spool.append(big[:2])
    spool.append([b"small"] + big[2:])
    got = []
    while True:
        batch = spool.read(max_records=1000, max_bytes=1000)  # smaller than any big entry
        if not batch.records:
            break
        got.extend(batch.records)
        spool.advance(batch.end)
    assert got == big[:2] + [b"small"] + big[2:]
    assert spool.corrupt_entries == 0


def test_pending_records_counts_what_read_would_return(tmp_path) -> None:
    spool = Spool(str(tmp_path), segment_bytes=500)
    sent = [b"r%03d" % i * 5 for i in range(120)]
    for i in range(0, 120, 9):
        spool.append(sent[i:i + 9])
    assert spool.pending_records() == 120
    batch = spool.read(max_records=50)
    spool.advance(batch.end)
    assert spool.pending_records(limit=10) == 10
    assert spool.pending_records() == 70 == len(_drain(spool))
    assert spool.pending_records() == 0
