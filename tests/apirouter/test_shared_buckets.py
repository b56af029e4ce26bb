"""The bucket segment: the same decisions as the pure model (property test), by the C core and
by its Python reference alike, which write the same bytes (property test); exact across
processes that share it, whichever path each takes; a killed lock holder blocks no one, and
settlement lands in the period of the reservation even after midnight (property test)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apirouter.budgets import Budget, Reservation, period_id
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import (
    BucketSpec,
    BucketState,
    Verdict,
    buckets_for,
    plan_for,
    planned_headers,
    rate_limit_headers,
    settle,
    take_all,
)
from apirouter.shared_buckets import BucketTable, Settlement, create_buckets_segment
from apirouter.shm import unlink

SPECS = [BucketSpec("key:a:rpm", 5, 60, 1), BucketSpec("key:a:tpm", 100, 600, 30),
         BucketSpec("org:o:rpm", 8, 6, 1)]


@given(st.lists(st.tuples(st.sets(st.integers(0, 2), min_size=1), st.integers(0, 3000),
                          st.integers(-40, 40)), max_size=40))
@settings(max_examples=150, deadline=None)
# Found by this test: a record whose slot the request's other record had just reused (it was
# expired) resolved to that same slot, and the second write lost the first.
@example([({0}, 0, 0), ({1}, 1000, -15), ({0, 1}, 1500, 0), ({0}, 0, 0)])
@pytest.mark.parametrize("core", [True, False], ids=["c-core", "python"])
def test_the_table_decides_as_the_pure_model(core: bool,
                                             steps: list[tuple[set[int], int, int]]) -> None:
    table = BucketTable.private(stripes=2, ways=4)  # small: stripes shared, slots reused
    if not core:
        table._core = None
    model: dict[str, BucketState] = {}
    now = 1_000_000.0
    for chosen, advance, delta in steps:
        now += advance
        specs = [SPECS[i] for i in sorted(chosen)]
        got, _ = table.admit(specs, [], None, now)
        want = take_all(specs, model, now)
        assert got == want
        if got.allowed and delta:
            table.settle([s for s in specs if s.name.endswith("tpm")], delta, [], None, now)
            for s in specs:
                if s.name.endswith("tpm"):
                    settle(s, model, now, delta)


def test_the_c_core_settles_only_int_or_float_deltas() -> None:
    # Converting anything else could run the caller's code between the core's passes over the
    # items (a __float__ that grew a records list overflowed the core's arrays: a crash).
    table = BucketTable.private(stripes=2, ways=4)
    core = table._core
    assert core is not None
    rec = table.record("key:a:tpm", 100, 600, None)

    class Delta:
        def __float__(self) -> float:
            return 1.0

    class Tokens(int):
        pass

    for delta in (Delta(), Tokens(1), 1.0j):
        with pytest.raises(TypeError):
            core.settle([([rec], delta)], 1000.0)
    assert core.settle([([rec], 1), ([rec], -2.5)], 1000.0) == 0


def test_the_c_core_is_built_and_in_use() -> None:
    # setup.py builds it; without it the limiter would silently cost ~4x as much
    assert BucketTable.private()._core is not None


NAMES = [f"key:{k}:{d}" for k in "abcdef" for d in ("rpm", "tpm")] + ["org:o:rpm"]


# At most 3 records a request: a stripe has 3 ways here (16 in the real segment, and a request
# has at most 6 records); more in one stripe is refused (a SegmentError), by both.
@given(st.lists(st.tuples(st.sets(st.integers(0, len(NAMES) - 1), min_size=1, max_size=3),
                          st.integers(0, 4000), st.integers(1, 40),
                          st.lists(st.integers(-60, 60), max_size=3)),
                max_size=60))
@settings(max_examples=200, deadline=None)
def test_the_c_core_writes_what_the_python_reference_writes(
        steps: list[tuple[set[int], int, int, list[int]]]) -> None:
    """Every verdict and every byte of the segment, step by step, with keys that crowd one
    stripe's ways (evictions, reused expired slots) and settlements that go negative."""
    fast = BucketTable.private(stripes=2, ways=3)
    ref = BucketTable.private(stripes=2, ways=3)
    ref._core = None
    now = 5_000_000.0
    for chosen, advance, cost, deltas in steps:
        now += advance
        specs = [BucketSpec(NAMES[i], 10 + 7 * i, 30 * (i % 5), cost if i % 2 else 1)
                 for i in sorted(chosen)]
        got, _ = fast.admit(specs, [], None, now)
        want, _ = ref.admit(specs, [], None, now)
        assert got == want
        assert bytes(fast._buf) == bytes(ref._buf)
        if deltas:  # one turn's settlements: refunds past capacity, charges below zero
            items: list[Settlement] = [(specs[i % 2:], d, [], None)
                                       for i, d in enumerate(deltas)]
            fast.settle_many(items, now)
            ref.settle_many(items, now)
            assert bytes(fast._buf) == bytes(ref._buf)


PLAN_TIERS = [None, Tier(3, 4, 0, 0), Tier(30, 40, 900, 1200), Tier(0, 0, 60, 80)]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                          st.integers(1, 700), st.integers(0, 3000), st.integers(-400, 400)),
                max_size=40))
@settings(max_examples=150, deadline=None)
@pytest.mark.parametrize("core", [True, False], ids=["c-core", "python"])
def test_a_planned_request_is_decided_settled_and_told_as_its_specs(
        core: bool, steps: list[tuple[int, int, int, int, int, int]]) -> None:
    """take_planned (the plan's records as they are, a token-bucket's cost the request's
    tokens) gives the verdict, writes the bytes and makes the headers that admit, settle and
    rate_limit_headers do with the request's specs (buckets_for)."""
    planned = BucketTable.private(stripes=2, ways=4)
    listed = BucketTable.private(stripes=2, ways=4)
    if not core:
        planned._core = listed._core = None
    now = 1_000_000.0
    for key_tier, org_tier, model_tier, tokens, advance, delta in steps:
        now += advance
        key = KeyRecord("p", "a" * 64, "o", "", frozenset({"inference"}), "t",
                        PLAN_TIERS[key_tier] or Tier(0, 0, 0, 0), False)
        plan = plan_for(key, "m", PLAN_TIERS[org_tier], PLAN_TIERS[model_tier])
        specs = buckets_for(key, "m", tokens, PLAN_TIERS[org_tier], PLAN_TIERS[model_tier])
        got = planned.take_planned(plan, tokens, now)
        want, _ = listed.admit(specs, [], None, now)
        assert got == want
        assert bytes(planned._buf) == bytes(listed._buf)
        if got.allowed and specs:
            assert planned_headers(plan, got, 1000.5) == rate_limit_headers(specs[0], got,
                                                                             1000.5)
        if got.allowed and delta:
            planned.settle_records([(plan.token_records, delta)], now)
            listed.settle([s for s in specs if s.name.endswith(":tpm")], delta, [], None, now)
            assert bytes(planned._buf) == bytes(listed._buf)


def _hammer(name: str, spec: BucketSpec, budget: Budget | None, n: int, core: bool,
            q: multiprocessing.Queue) -> None:
    table = BucketTable.attach(name)
    if not core:
        table._core = None
    admitted = 0
    for _ in range(n):
        if budget is None:  # token buckets only: the C core (or its reference)
            v, _ = table.admit([spec], [], None, time.monotonic() * 1000)
        else:
            v, _ = table.admit([spec], [(budget, "2026-11-29")], Reservation(0, 1, 1),
                               time.monotonic() * 1000)
        admitted += v.allowed
    q.put(admitted)


@pytest.fixture
def segment() -> Iterator[str]:
    shm = create_buckets_segment(f"apirouter-test-{uuid.uuid4().hex[:8]}-buckets", 64, 4)
    yield shm.name
    shm.close()
    unlink(shm.name)


def _in_processes(target: Callable[..., None], args: list[tuple[object, ...]]) -> list[int]:
    """Run ``target(*a, q)`` in a spawned process per ``a``; what each puts on ``q``."""
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, q)) for a in args]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    return got


def test_processes_sharing_the_segment_admit_exactly(segment: str) -> None:
    rpm = BucketSpec("key:p:rpm", 300, 1, 1)
    quota = Budget("org:p", "day", -1, -1, 250)
    total = sum(_in_processes(_hammer, [(segment, rpm, quota, 200, True)] * 4))
    assert total == 250  # the quota, not 4 x 200 requests nor the bucket's 300
    table = BucketTable.attach(segment)
    assert table.used(quota, "2026-11-29", time.monotonic() * 1000)["requests"] == 250


def test_the_c_core_and_the_python_path_share_one_segment_exactly(segment: str) -> None:
    """Four processes on one bucket, two through the C core and two through the Python path:
    the bucket's capacity is admitted, not a request more (both lock the same stripes)."""
    rpm = BucketSpec("key:c:rpm", 300, 1, 1)
    total = sum(_in_processes(_hammer, [(segment, rpm, None, 200, i % 2 == 0)
                                        for i in range(4)]))
    assert total == 300


def _hold_forever(name: str, ready: multiprocessing.Event) -> None:
    table = BucketTable.attach(name)
    table._lock(list(range(table.stripes)))
    ready.set()
    time.sleep(60)


def test_a_killed_lock_holder_blocks_no_one(segment: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_forever, args=(segment, ready))
    holder.start()
    assert ready.wait(10)
    assert holder.pid is not None
    table = BucketTable.attach(segment)
    # An admission that starts while the stripe is held waits for it (the C core's blocking
    # path), and goes through once the holder is killed.
    got: list[Verdict] = []
    waiter = threading.Thread(target=lambda: got.append(table.admit(
        [BucketSpec("key:k:rpm", 2, 1, 1)], [], None, time.monotonic() * 1000)[0]))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # still waiting for the lock
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    waiter.join(10)
    assert len(got) == 1 and got[0].allowed and got[0].remaining == 1


def test_a_stripe_lock_taken_twice_by_its_holder_is_an_error_not_a_hang(segment: str) -> None:
    table = BucketTable.attach(segment)
    table._lock([3, 5])
    try:
        with pytest.raises(OSError):  # EDEADLK: the mutexes check their owner
            table._lock([5])
    finally:
        table._unlock([3, 5])
    table._lock([5])  # released: free again
    table._unlock([5])


def _settle_everywhere(name: str, rounds: int, q: multiprocessing.Queue) -> None:
    """Each round: one settlement of a ledger in every stripe, under one round of locks (more
    stripes than a request's records: the Python path's lock call has no such bound)."""
    table = BucketTable.attach(name)
    budgets = [Budget(f"org:{i}", "day", -1, -1, 10**6) for i in range(300)]
    for _ in range(rounds):
        table.settle_many([([], 0, [(b, "2026-11-29")], (0, 0, 1)) for b in budgets],
                          time.monotonic() * 1000)
    q.put(len({table._key(f"ledger:{b.scope}:2026-11-29")[1] for b in budgets}))


def test_settlements_over_many_stripes_from_several_processes_all_land() -> None:
    shm = create_buckets_segment(f"apirouter-test-{uuid.uuid4().hex[:8]}-buckets", 256, 16)
    try:
        stripes = _in_processes(_settle_everywhere, [(shm.name, 50)] * 3)
        assert stripes[0] > 64  # each round locks this many stripes at once
        table = BucketTable.attach(shm.name)
        now = time.monotonic() * 1000
        assert [table.used(Budget(f"org:{i}", "day", -1, -1, 10**6), "2026-11-29",
                           now)["requests"] for i in range(300)] == [150] * 300
    finally:
        shm.close()
        unlink(shm.name)


@given(st.floats(0, 86_399.999), st.floats(0, 7200), st.integers(0, 5000))
@settings(max_examples=100, deadline=None)
def test_settlement_goes_to_the_period_of_the_reservation(
        at: float, later: float, actual: int) -> None:
    day = 1_764_374_400.0  # 2025-11-29 00:00:00 UTC
    admitted_at = day + at
    budget = Budget("org:p", "day", -1, 100_000, -1)
    period = period_id("day", admitted_at)
    table = BucketTable.private()
    r = Reservation(0, 1000, 1)
    v, refused = table.admit([], [(budget, period)], r, 0.0)
    assert v.allowed and refused is None
    # Settled ``later`` seconds on (perhaps the next day): still into the admission's period.
    table.settle([], 0, [(budget, period)], (0, actual - r.tokens, 0), later * 1000)
    assert table.used(budget, period, later * 1000)["tokens"] == actual
    if period_id("day", admitted_at + later) != period:
        assert table.used(budget, period_id("day", admitted_at + later),
                          later * 1000)["tokens"] == 0


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.integers(-50, 20_000),
       st.integers(0, 10**7))
def test_rate_limit_headers_are_consistent(capacity: int, rate: int, remaining: int,
                                           reset_ms: int) -> None:
    spec = BucketSpec("key:k:rpm", max(capacity, rate), rate, 1)
    h = dict(rate_limit_headers(spec, Verdict(True, None, remaining, 0, reset_ms), 1000.5))
    assert 0 <= int(h["X-RateLimit-Remaining"]) <= int(h["X-RateLimit-Limit"]) == spec.capacity
    assert int(h["X-RateLimit-Reset"]) >= 1000.5 + reset_ms / 1000
    assert h["X-RateLimit-Policy"] == f"{spec.capacity};w=60;rate={rate}"
