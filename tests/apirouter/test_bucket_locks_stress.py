"""Review of 4b410a6 (a robust pthread mutex per stripe): processes admitting on shared stripes
while one of them is SIGKILLed again and again at random points of its admissions (holding a
stripe, waiting for one, releasing one): nobody hangs, no stripe stays locked, and no more is
admitted than a bucket's capacity or a budget's quota."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
import uuid
from collections.abc import Iterator

import pytest

from apirouter.budgets import Budget, Reservation
from apirouter.limits import BucketSpec
from apirouter.shared_buckets import BucketTable, create_buckets_segment
from apirouter.shm import unlink

STRIPES, WAYS = 4, 8
CAP = 3000  # a bucket that never refills (per_minute 0): admitted once each, CAP at most
QUOTA = 1000
PERIOD = "2026-11-29"
STOP, GO = 0, 1  # the admitters' shared flags
OWNER_DIED = 0x40000000


def _specs(i: int) -> list[BucketSpec]:
    # key:s:rpm and key:s:tpm share a stripe; org:s:rpm is in another one (or the same)
    return [BucketSpec("key:s:rpm", CAP, 0, 1), BucketSpec("key:s:tpm", 10**9, 0, 1),
            BucketSpec("org:s:rpm", 10**9, 0, 1)][: 1 + i % 3]


def _admitter(name: str, counts: multiprocessing.Array, progress: multiprocessing.Array,
              slot: int, flags: multiprocessing.Array, python: bool) -> None:
    """Admissions on the C path and the Python path (a budget ledger), settlements over
    every stripe; each admission counted in shared memory right after it is decided."""
    table = BucketTable.attach(name)
    if python:
        table._core = None
    quota = Budget("org:q", "day", -1, -1, QUOTA)
    n = 0
    deadline = time.monotonic() + 60
    # flags: [stop, go]. Plain shared words, not multiprocessing Events: an Event takes a lock
    # to be read, and a victim killed inside is_set() held it for good (the others hung).
    while not (n % 64 == 0 and (flags[STOP] or time.monotonic() > deadline)):
        n += 1
        progress[slot] = n
        if slot < 2:
            parked = time.monotonic()  # the test parks the steady ones to see what a killed
            while not flags[GO] and time.monotonic() - parked < 10:  # one left
                time.sleep(0.0005)
        now = time.monotonic() * 1000
        specs = _specs(n)
        if n % 2:
            v, _ = table.admit(specs, [], None, now)
            if v.allowed:
                counts[2 * slot] += 1
        else:
            v, _ = table.admit(specs[:1], [(quota, PERIOD)], Reservation(0, 1, 1), now)
            if v.allowed:
                counts[2 * slot] += 1
                counts[2 * slot + 1] += 1
        if n % 7 == 0:
            table.settle_many([(_specs(2)[1:], 0, [(Budget(f"org:x{j}", "day", -1, -1, 10**9),
                                                     PERIOD)], (0, 0, 0)) for j in range(8)],
                              now)


@pytest.fixture
def segment() -> Iterator[str]:
    shm = create_buckets_segment(f"apirouter-test-{uuid.uuid4().hex[:8]}-buckets", STRIPES,
                                 WAYS)
    yield shm.name
    shm.close()
    unlink(shm.name)


def _lock_words(name: str) -> list[int]:
    with open(f"/dev/shm/{name}", "rb") as f:
        data = f.read()
    at = (32 + STRIPES * WAYS * 40 + 63) // 64 * 64
    return [struct.unpack_from("<I", data, at + 64 * s)[0] for s in range(STRIPES)]


def test_processes_admit_exactly_while_one_is_killed_again_and_again(segment: str) -> None:
    ctx = multiprocessing.get_context("fork")
    kills = 150
    counts = ctx.Array("q", 2 * (kills + 3), lock=False)
    progress = ctx.Array("q", kills + 3, lock=False)
    flags = ctx.Array("q", 2, lock=False)
    flags[GO] = 1
    # daemon: a failing run must not leave the suite's exit waiting on its children
    steady = [ctx.Process(target=_admitter, args=(segment, counts, progress, i, flags, i == 1),
                          daemon=True) for i in range(2)]
    for p in steady:
        p.start()
    rng = random.Random(4)
    died_holding = 0
    try:
        for k in range(kills):
            if k % 2:
                flags[GO] = 0
            else:
                flags[GO] = 1
            victim = ctx.Process(target=_admitter,
                                 args=(segment, counts, progress, 2 + k, flags, k % 2),
                                 daemon=True)
            victim.start()
            started = time.monotonic()
            while progress[2 + k] == 0 and time.monotonic() - started < 10:
                time.sleep(0.0005)
            time.sleep(rng.random() * 0.003)
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            if k % 2:
                time.sleep(0.002)
                died_holding += any(w & OWNER_DIED for w in _lock_words(segment))
        flags[STOP] = 1
        flags[GO] = 1
        for p in steady:
            p.join(90)
        hung = [p.pid for p in steady if p.is_alive()]
        assert not hung, f"admitters hung: {hung}; lock words {_lock_words(segment)}"
        assert all(p.exitcode == 0 for p in steady), [p.exitcode for p in steady]
    finally:
        for p in steady:
            if p.is_alive():
                p.kill()
    admitted = sum(counts[0::2])
    budgeted = sum(counts[1::2])
    table = BucketTable.attach(segment)
    now = time.monotonic() * 1000
    bucket = table.bucket("key:s:rpm", now)
    used = table.used(Budget("org:q", "day", -1, -1, QUOTA), PERIOD, now)["requests"]
    print(f"kills {kills}, died holding a stripe {died_holding}; admitted {admitted} "
          f"(bucket left {bucket}), budgeted {budgeted} (ledger {used})")
    assert admitted <= CAP and budgeted <= QUOTA and used <= QUOTA
    # a killed process may have been admitted without counting it (killed in between): one
    # each at most
    assert bucket is not None
    assert CAP - kills <= admitted + bucket.tokens <= CAP
    assert all(w & 0x3FFFFFFF == 0 for w in _lock_words(segment))  # nobody holds a stripe


def _hold(name: str, stripes: list[int], ready: multiprocessing.Event,
          release: multiprocessing.Event) -> None:
    table = BucketTable.attach(name)
    table._lock(stripes)
    ready.set()
    release.wait(30)
    table._unlock(stripes)


def _admit_once(name: str, python: bool, done: multiprocessing.Event) -> None:
    table = BucketTable.attach(name)
    if python:
        table._core = None
    table.admit([BucketSpec("key:w:rpm", 10, 1, 1)], [], None, time.monotonic() * 1000)
    done.set()


@pytest.mark.parametrize("holder_dies", [False, True], ids=["released", "killed"])
def test_waiters_killed_while_waiting_leave_the_stripe_free(segment: str,
                                                            holder_dies: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    table = BucketTable.attach(segment)
    stripe = table._key("key:w:rpm")[1]
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(segment, [stripe], ready, release))
    holder.start()
    assert ready.wait(20)
    dones = [ctx.Event() for _ in range(4)]
    waiters = [ctx.Process(target=_admit_once, args=(segment, i % 2 == 1, dones[i]))
               for i in range(4)]
    for w in waiters:
        w.start()
    deadline = time.monotonic() + 20
    while not _lock_words(segment)[stripe] & 0x80000000 and time.monotonic() < deadline:
        time.sleep(0.01)  # FUTEX_WAITERS: someone sleeps on the stripe
    time.sleep(0.5)  # all four (spawned) waiters blocked by now, usually
    assert not any(d.is_set() for d in dones)
    for w in waiters[:3]:
        assert w.pid is not None
        os.kill(w.pid, signal.SIGKILL)
        w.join(10)
    if holder_dies:
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
    else:
        release.set()
    holder.join(10)
    waiters[3].join(20)
    assert dones[3].is_set(), f"the last waiter hung; lock word {_lock_words(segment)[stripe]:#x}"
    late = ctx.Event()
    p = ctx.Process(target=_admit_once, args=(segment, False, late))
    p.start()
    p.join(20)
    assert late.is_set()
    assert _lock_words(segment)[stripe] & 0x3FFFFFFF == 0


class _Interrupted(Exception):
    pass


def _interrupted_while_waiting(name: str, stripe_name: str, q: multiprocessing.Queue) -> None:
    """A read of a budget ledger (the Python path) waits for a held stripe; a signal handler
    raises meanwhile (as KeyboardInterrupt, or gunicorn's SIGABRT handler, do). Then the same
    process reads again and reports what it got."""
    table = BucketTable.attach(name)
    budget = Budget(stripe_name, "day", -1, -1, 10)

    def boom(*_: object) -> None:
        raise _Interrupted

    signal.signal(signal.SIGUSR1, boom)
    try:
        table.used(budget, PERIOD, time.monotonic() * 1000)
        q.put("not interrupted")
        return
    except _Interrupted:
        pass
    try:
        table.used(budget, PERIOD, time.monotonic() * 1000)
        q.put("ok")
    except OSError as e:
        q.put(f"OSError: {e}")


def test_a_signal_raising_while_a_stripe_is_awaited_leaves_no_lock_held(segment: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    table = BucketTable.attach(segment)
    stripe = table._stripes([f"ledger:org:i:{PERIOD}"])[0]
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(segment, [stripe], ready, release))
    holder.start()
    assert ready.wait(20)
    q: multiprocessing.Queue[str] = ctx.Queue()
    reader = ctx.Process(target=_interrupted_while_waiting, args=(segment, "org:i", q))
    reader.start()
    deadline = time.monotonic() + 20
    while not _lock_words(segment)[stripe] & 0x80000000 and time.monotonic() < deadline:
        time.sleep(0.01)  # FUTEX_WAITERS: the reader sleeps on the stripe
    assert reader.pid is not None
    os.kill(reader.pid, signal.SIGUSR1)
    release.set()
    holder.join(10)
    got = q.get(timeout=20)
    reader.join(10)
    assert got == "ok", got  # the interrupted read left nothing held: the next one works
