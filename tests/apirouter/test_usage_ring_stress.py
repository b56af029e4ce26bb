"""The usage ring under real concurrency: writers and the drainer in separate processes.

Each writer keeps at most WINDOW records outstanding (it waits for the drainer's
acknowledgement through a shared counter), so its ring can never be genuinely full: every
refusal is a spurious overflow. The drainer checks that every writer's records arrive exactly
once and in order; an "inconsistent indices" error, a checksum failure or a gap is an
inconsistency. Both must be zero.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import time
from typing import Any

from apirouter.shm import SegmentError
from apirouter.usage_ring import (
    RingConsumer,
    RingProducer,
    attach_usage_segment,
    create_usage_segment,
    unlink_segment,
)

WRITERS = 2
CAPACITY = 64 * 1024
MAX_RECORD = 300
WINDOW = CAPACITY // (2 * (MAX_RECORD + 16))  # outstanding records: at most half the ring
DURATION_S = 3.0


def _writer(name: str, slot: int, acked: Any, done: Any, out: Any) -> None:
    shm = attach_usage_segment(name)
    ring = RingProducer(shm, slot)
    seq = refused = 0
    deadline = time.monotonic() + DURATION_S
    while time.monotonic() < deadline:
        if seq - acked[slot] >= WINDOW:
            time.sleep(0)
            continue
        record = b"%d:%d:" % (slot, seq) + b"x" * (seq * 7919 % (MAX_RECORD - 20))
        if ring.put(record):
            seq += 1
        else:
            refused += 1  # the ring holds at most half its capacity: never genuinely full
    done[slot] = seq
    out.put(("writer", slot, seq, refused))
    ring.release()
    shm.close()


def _drainer(name: str, acked: Any, done: Any, out: Any) -> None:
    shm = attach_usage_segment(name)
    rings = [RingConsumer(shm, i) for i in range(WRITERS)]
    expected = [0] * WRITERS
    inconsistent = 0
    deadline = time.monotonic() + DURATION_S + 30
    while time.monotonic() < deadline:
        for slot, ring in enumerate(rings):
            try:
                records, position = ring.peek(16 * 1024)
            except SegmentError:
                inconsistent += 1
                continue
            for rec in records:
                s, seq, _ = rec.split(b":", 2)
                if int(s) != slot or int(seq) != expected[slot]:
                    inconsistent += 1
                    expected[slot] = int(seq)
                expected[slot] += 1
            ring.commit(position)
            acked[slot] = expected[slot]
        if all(done[i] >= 0 and expected[i] >= done[i] for i in range(WRITERS)):
            break
    out.put(("drainer", expected, inconsistent))
    for ring in rings:
        ring.release()
    shm.close()


def test_concurrent_writers_and_drainer_see_no_spurious_overflow_or_inconsistency() -> None:
    ctx = mp.get_context("fork")
    name = f"apirouter-test-stress{os.getpid()}-usage"
    shm = create_usage_segment(name, WRITERS, CAPACITY)
    acked = ctx.RawArray(ctypes.c_int64, WRITERS)
    done = ctx.RawArray(ctypes.c_int64, [-1] * WRITERS)
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(name, i, acked, done, out))
             for i in range(WRITERS)]
    procs.append(ctx.Process(target=_drainer, args=(name, acked, done, out)))
    try:
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shm.close()
        unlink_segment(shm)
    writers = {r[1]: r for r in results if r[0] == "writer"}
    (_, received, inconsistent), = [r for r in results if r[0] == "drainer"]
    written = [writers[i][2] for i in range(WRITERS)]
    spurious = sum(writers[i][3] for i in range(WRITERS))
    print(f"written {written}, received {received}, spurious overflows {spurious}, "
          f"inconsistencies {inconsistent}")
    assert min(written) > 1000  # the load was real
    assert (spurious, inconsistent) == (0, 0)
    assert received == written
