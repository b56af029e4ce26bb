"""The bucket segment: the in-process limiter's token buckets and budget ledgers, shared by
every worker of one instance, so a limit holds for the instance whatever worker serves a
request and however many workers there are.

Byte layout (little endian, 8-byte words)::

    header  0   8  magic b"APIRBKT\\x01"
            8   4  layout version u32
            12  4  stripes u32 (S)
            16  4  ways u32 (W): slots per stripe
            20 12  reserved
    slot (stripe s, way w) at 32 + (s * W + w) * 40:
      word 0  key     u64: 8 bytes of BLAKE2b of the record's name; 0: never used
      word 1  expires f64: monotonic ms after which the record is as good as absent (a bucket
                           full again, a ledger past its period): the slot may be reused
      words 2-4        a bucket: tokens, at (monotonic ms), unused
                       a ledger: spend (micro), tokens, requests used in its period
    lock of stripe s at L + s * 64, L the end of the slots rounded up to 64 bytes: a
      process-shared, robust pthread mutex (apirouter/_bucketcore.c makes and takes them)

A record lives in the stripe of its scope (its name up to the last ``:`` — ``key:{id}``,
``org:{org}``, ``key:{id}:model:{m}``, ``ledger:{scope}``), in any of its W ways: a key's rpm
and tpm buckets share a stripe, so a request without org or model limits or budgets takes one
lock, not one per bucket. Every read-modify-write of a stripe happens under the stripe's mutex
in the segment: uncontended it costs two atomic instructions (the ``lockf`` record locks it
replaced were two system calls each), and it is robust: when its holder dies, the next taker
gets it and goes on, so a killed worker never leaves a stripe locked. A request locks the
stripes of all its
records in ascending order (no deadlock), decides with the pure functions of
apirouter/limits.py and apirouter/budgets.py, and writes each slot back as one whole-slice
write. CLOCK_MONOTONIC is the same clock in every process.
When every way of a stripe holds a live record, the one full again soonest is evicted (a
warning: the segment is too small for the live keys).
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import struct
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory

# The stripe locks and the bucket arithmetic in C (apirouter/_bucketcore.c, built by setup.py:
# `pip install -e .`, or `python setup.py build_ext --inplace` in a source tree).
from apirouter._bucketcore import Core, init_locks
from apirouter._bucketcore import size as segment_size
from apirouter.budgets import Budget, Reservation, period_ttl_ms, refused
from apirouter.limits import BucketPlan, BucketSpec, BucketState, Verdict, new_verdict, take_all
from apirouter.shm import SegmentError, open_segment, unlink

log = logging.getLogger("apirouter.limits")

MAGIC = b"APIRBKT\x01"
LAYOUT_VERSION = 3  # 2: records striped by scope; 3: a mutex per stripe in the segment
_HEADER = struct.Struct("<8sIII")
_HEADER_SIZE = 32
_SLOT = struct.Struct("<Qdddd")
_KEY = struct.Struct("<Qd")
STRIPES = 1024
WAYS = 16
BUCKETS_SEGMENT_ENV = "APIROUTER_BUCKETS_SHM"
_DIMENSIONS = ("spend", "tokens", "requests")
# One settlement: (token buckets, their token delta, (budget, period) ledgers, ledger delta).
Settlement = tuple[list[BucketSpec], int, list[tuple[Budget, str]], tuple[int, int, int] | None]
# A bucket as the C core takes it: (the 64 bits of its name, of its scope — its stripe is
# scope % stripes —, capacity, per minute, cost; None: the request's tokens). What the
# names hash to and the limits are fixed: a plan's records are made once (take_planned).
Record = tuple[int, int, int, int, int | None]
Records = Sequence[Record]


def _init(buf: memoryview, stripes: int, ways: int) -> None:
    buf[:segment_size(stripes, ways)] = bytes(segment_size(stripes, ways))
    init_locks(buf, stripes, ways)
    buf[:_HEADER.size] = _HEADER.pack(MAGIC, LAYOUT_VERSION, stripes, ways)


def create_buckets_segment(name: str, stripes: int = STRIPES, ways: int = WAYS, *,
                           replace_foreign: bool = False) -> shared_memory.SharedMemory:
    """The supervisor's part: create the zeroed segment, or take over the one a previous
    supervisor of this instance left (its workers may still be admitting on it). One of
    another layout (a previous version's) is replaced when ``replace_foreign`` (none of its
    workers is alive: nobody uses it), its records carried over when only the locks differ
    (layout 2: the same slots). Untracked: the supervisor unlinks it when it stops."""
    size = segment_size(stripes, ways)
    shm, created = open_segment(name, size)
    assert shm.buf is not None
    if created:
        _init(shm.buf, stripes, ways)
        return shm
    found = _HEADER.unpack_from(shm.buf, 0) if shm.size >= _HEADER.size else None
    if found == (MAGIC, LAYOUT_VERSION, stripes, ways) and shm.size >= size:
        return shm
    if not replace_foreign:
        shm.close()
        raise SegmentError(f"segment {name!r} exists with another layout ({found!r}) and "
                           f"workers of the router that made it still run: stop them first")
    slots_end = _HEADER_SIZE + stripes * ways * _SLOT.size
    slots = (bytes(shm.buf[_HEADER_SIZE:slots_end])
             if found == (MAGIC, 2, stripes, ways) and shm.size >= slots_end else None)
    shm.close()
    unlink(name)
    shm, _ = open_segment(name, size)
    assert shm.buf is not None
    _init(shm.buf, stripes, ways)
    if slots is not None:
        shm.buf[_HEADER_SIZE:slots_end] = slots
    log.warning("bucket segment %s was of another layout (%r): replaced%s", name, found,
                ", its records kept" if slots is not None else "")
    return shm


class BucketTable:
    """One process's handle on the bucket records (shared, or private to the process)."""

    def __init__(self, buf: memoryview, shared: bool, keep: object = None) -> None:
        magic, layout, self.stripes, self.ways = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or layout != LAYOUT_VERSION:
            raise SegmentError(f"not a bucket segment of layout {LAYOUT_VERSION}")
        self._buf = buf
        self.shared = shared  # False: private to this process, nothing to lock
        self._keep = keep  # what owns the memory
        self._hint: dict[int, int] = {}  # key -> slot offset where it was last found
        self._hashes: dict[str, tuple[int, int]] = {}  # name -> (key, scope)
        self._locks = Core(buf, shared, self.stripes, self.ways)
        # Token buckets without ledgers (every request of the in-process limiter) go through
        # the C core: the same arithmetic on the same slots under the same locks, ~4x cheaper
        # (None: the Python reference does it, for the tests that hold the two to each other).
        self._core: Core | None = self._locks

    @classmethod
    def attach(cls, name: str) -> BucketTable:
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise SegmentError(f"no shared-memory segment {name!r}") from None
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        assert shm.buf is not None
        return cls(shm.buf, True, shm)

    @classmethod
    def private(cls, stripes: int = 64, ways: int = WAYS) -> BucketTable:
        """For a process without a supervisor (tests, benchmarks): nothing shared."""
        mem = mmap.mmap(-1, segment_size(stripes, ways))
        view = memoryview(mem)
        _init(view, stripes, ways)
        return cls(view, False, mem)

    # -- records --------------------------------------------------------------------------------

    def _hash(self, name: str) -> tuple[int, int]:
        """(key, scope) of a record's name: the 64 bits of the name and of its scope, hashed
        once a name (bounded: the slot hints go with the names they were found for)."""
        found = self._hashes.get(name)
        if found is None:
            if len(self._hashes) > 65536:
                self._hashes.clear()
                self._hint.clear()
            found = self._hashes[name] = (_hash64(name) or 1,
                                           _hash64(name.rpartition(":")[0]))
        return found

    def _key(self, name: str) -> tuple[int, int]:
        """(key, stripe) of a record's name."""
        key, scope = self._hash(name)
        return key, scope % self.stripes

    def record(self, name: str, capacity: int, per_minute: int, cost: int | None) -> Record:
        """A bucket as ``take`` and ``settle_records`` take it (its name hashed once)."""
        key, scope = self._hash(name)
        return (key, scope, capacity, per_minute, cost)

    def _slot(self, key: int, stripe: int, now_ms: float, taken: list[int]) -> tuple[int, bool]:
        """(offset, live) of the record under ``key``, or of a slot to put it in that is not
        among ``taken`` (the slots other records of the same operation resolved to)."""
        buf = self._buf
        off = self._hint.get(key)
        # A slot another record of this operation resolved to is not this record's any more
        # (it was expired, so reused): this one is absent, and goes elsewhere.
        if off is not None and off not in taken:
            k, expires = _KEY.unpack_from(buf, off)
            if k == key:
                return off, expires > now_ms
        first = _HEADER_SIZE + stripe * self.ways * _SLOT.size
        free = victim = -1
        soonest = float("inf")
        for way in range(self.ways):
            off = first + way * _SLOT.size
            if off in taken:
                continue
            k, expires = _KEY.unpack_from(buf, off)
            if k == key:
                self._hint[key] = off
                return off, expires > now_ms
            if free < 0 and (k == 0 or expires <= now_ms):
                free = off
            elif victim < 0 or expires < soonest:  # (a bucket that never refills: inf)
                soonest, victim = expires, off
        if free < 0:
            if victim < 0:
                raise SegmentError(f"one request has more records in a stripe than its "
                                   f"{self.ways} ways")
            _warn_evicted(self.ways)
            free = victim
        self._hint[key] = free
        return free, False

    def _resolve(self, names: list[str], now_ms: float) -> list[tuple[int, int, bool]]:
        """(key, offset, live) of each record, under the stripe locks."""
        out: list[tuple[int, int, bool]] = []
        taken: list[int] = []
        for name in names:
            key, stripe = self._key(name)
            off, live = self._slot(key, stripe, now_ms, taken)
            taken.append(off)
            out.append((key, off, live))
        return out

    def _lock(self, stripes: list[int]) -> None:
        """Lock these stripes (ascending), as the C core does, through it."""
        if self.shared:
            self._locks.lock(stripes)

    def _unlock(self, stripes: list[int]) -> None:
        if self.shared:
            self._locks.unlock(stripes)

    def _stripes(self, names: list[str]) -> list[int]:
        return sorted({self._key(n)[1] for n in names})

    def _states(self, specs: list[BucketSpec], found: list[tuple[int, int, bool]]
                ) -> dict[str, BucketState]:
        states = {}
        for spec, (_, off, live) in zip(specs, found, strict=False):
            if live:
                _, _, tokens, at, _ = _SLOT.unpack_from(self._buf, off)
                states[spec.name] = BucketState(tokens, at)
        return states

    def _write_bucket(self, spec: BucketSpec, key: int, off: int, state: BucketState) -> None:
        rate = spec.refill_per_ms
        full_at = state.at_ms + (spec.capacity - state.tokens) / rate if rate > 0 else \
            float("inf")
        self._buf[off:off + _SLOT.size] = _SLOT.pack(key, full_at, state.tokens, state.at_ms,
                                                     0.0)

    def _ledger(self, off: int, live: bool) -> dict[str, int]:
        if not live:
            return {d: 0 for d in _DIMENSIONS}
        _, _, *values = _SLOT.unpack_from(self._buf, off)
        return {d: int(v) for d, v in zip(_DIMENSIONS, values, strict=True)}

    def _write_ledger(self, key: int, off: int, b: Budget, used: dict[str, int], spend: int,
                      tokens: int, requests: int, now_ms: float) -> None:
        self._buf[off:off + _SLOT.size] = _SLOT.pack(
            key, now_ms + period_ttl_ms(b.period), used["spend"] + spend,
            used["tokens"] + tokens, used["requests"] + requests)

    # -- decisions ------------------------------------------------------------------------------

    def admit(self, specs: list[BucketSpec], budgets: list[tuple[Budget, str]],
              r: Reservation | None, now_ms: float) -> tuple[Verdict, tuple[Budget, str] | None]:
        """Charge every bucket and reserve on every budget ledger, or nothing: (verdict, the
        budget and dimension that refused, if one did). ``budgets``: (budget, period id)."""
        if r is None:
            return self._take(specs, now_ms), None
        names = [s.name for s in specs]
        names += [_ledger_name(b, p) for b, p in budgets]
        stripes = self._stripes(names)
        self._lock(stripes)
        try:
            found = self._resolve(names, now_ms)
            ledgers = found[len(specs):]
            used = [self._ledger(off, live) for _, off, live in ledgers]
            for (b, _), u in zip(budgets, used, strict=False):
                assert r is not None
                dim = refused(b, u, r)
                if dim is not None:
                    return Verdict(False, None, 0, 0, 0), (b, dim)
            states = self._states(specs, found)
            verdict = take_all(specs, states, now_ms)
            if not verdict.allowed:
                return verdict, None
            for s, (key, off, _) in zip(specs, found, strict=False):
                self._write_bucket(s, key, off, states[s.name])
            if r is not None:
                for (b, _), (key, off, _), u in zip(budgets, ledgers, used, strict=True):
                    self._write_ledger(key, off, b, u, r.spend_micro, r.tokens, r.requests,
                                       now_ms)
            return verdict, None
        finally:
            self._unlock(stripes)

    def _take(self, specs: list[BucketSpec], now_ms: float) -> Verdict:
        """``admit`` without budgets: by the C core where it is built."""
        if not specs:
            return Verdict(True, None, 0, 0, 0)
        index, remaining, reset, retry, evicted = self.take(
            [self.record(s.name, s.capacity, s.per_minute, s.cost) for s in specs], 0, now_ms)
        if evicted:
            _warn_evicted(self.ways)
        if index < 0:
            return Verdict(True, None, remaining, 0, reset)
        return Verdict(False, specs[index], remaining, retry, reset)

    def take_planned(self, plan: BucketPlan, tokens: int, now_ms: float) -> Verdict:
        """``_take`` of limits.buckets_for(..., tokens, ...) (``tokens`` > 0), on the plan's
        records as they are: no object made a bucket a request, no name looked up."""
        records = plan.records
        if records is None:
            records = self._plan_records(plan)
        if not records:
            return _ADMITTED_UNLIMITED
        core = self._core  # (take, without its call)
        got = core.take(records, tokens, now_ms) if core is not None else NotImplemented
        index, remaining, reset, retry, evicted = (
            got if got is not NotImplemented else self._take_py(records, tokens, now_ms))
        if evicted:
            _warn_evicted(self.ways)
        if index < 0:
            return new_verdict(Verdict, (True, None, remaining, 0, reset))
        return Verdict(False, plan.spec(index, tokens), remaining, retry, reset)

    def _plan_records(self, plan: BucketPlan) -> tuple[Record, ...]:
        records = tuple(self.record(name, capacity, per_minute, None if spec is None else 1)
                        for spec, name, capacity, per_minute in plan.steps)
        plan.token_records = tuple(r for r, (spec, *_) in zip(records, plan.steps, strict=True)
                                   if spec is None)
        plan.records = records
        return records

    def take(self, records: Records, tokens: int, now_ms: float
             ) -> tuple[int, int, int, int, int]:
        """Charge every bucket its cost (None: ``tokens``) or none: (index of the first that
        refused, or -1: admitted; max(0, int(tokens left)) of that bucket, or of the first one
        when admitted; ms until it is full; ms until it holds the cost, 0 when admitted; how
        many live records were evicted to make room). By the C core where it is built."""
        core = self._core
        if core is not None:
            got = core.take(records, tokens, now_ms)
            if got is not NotImplemented:  # (a cost no double holds exactly)
                return got
        return self._take_py(records, tokens, now_ms)

    def _take_py(self, records: Records, tokens: int, now_ms: float
                 ) -> tuple[int, int, int, int, int]:
        """``take`` in Python, the reference the C core is held to: the arithmetic of
        limits.take_all (the model tests/apirouter/test_shared_buckets.py holds both to) on the
        slots directly, without its intermediate objects."""
        stripes_n = self.stripes
        stripe = records[0][1] % stripes_n
        stripes = ([stripe] if all(r[1] % stripes_n == stripe for r in records)
                   else sorted({r[1] % stripes_n for r in records}))
        buf = self._buf
        self._lock(stripes)
        try:
            taken: list[int] = []
            charged: list[tuple[int, int, float, float, float]] = []
            for key, scope, capacity, per_minute, cost in records:
                off, live = self._slot(key, scope % stripes_n, now_ms, taken)
                taken.append(off)
                cap = float(capacity)
                rate = per_minute / 60_000.0
                level = _level(buf, off, live, cap, rate, now_ms)
                need = tokens if cost is None else cost
                if level < need:
                    retry = math.ceil((need - level) / rate) if rate > 0 else 60_000
                    return (len(charged), max(0, int(level)),
                            math.ceil((cap - level) / rate) if rate > 0 else 0, retry, 0)
                charged.append((key, off, level - need, cap, rate))
            for key, off, left, cap, rate in charged:
                _put(buf, off, key, left, cap, rate, now_ms)
        finally:
            self._unlock(stripes)
        _, _, left, cap, rate = charged[0]
        return (-1, max(0, int(left)), math.ceil((cap - left) / rate) if rate > 0 else 0, 0, 0)

    def settle(self, specs: list[BucketSpec], delta: int, budgets: list[tuple[Budget, str]],
               budget_delta: tuple[int, int, int] | None, now_ms: float) -> None:
        """Correct token buckets by ``delta`` and ledgers by ``budget_delta`` after the fact."""
        self.settle_many([(specs, delta, budgets, budget_delta)], now_ms)

    def settle_many(self, items: list[Settlement], now_ms: float) -> None:
        """Several settlements under one round of locks (a worker batches those of one event
        loop turn: under load, one lock for many requests); those of token buckets alone by
        ``settle_records`` (the C core where it is built), in a round of their own."""
        record = self.record
        buckets = [([record(s.name, s.capacity, s.per_minute, None) for s in specs], delta)
                   for specs, delta, _, budget_delta in items if budget_delta is None and specs]
        if buckets:
            self.settle_records(buckets, now_ms)
        items = [item for item in items if item[3] is not None]
        if items:
            self._settle_py(items, now_ms)

    def settle_records(self, items: Sequence[tuple[Records, int]], now_ms: float) -> None:
        """Correct the token buckets of each item by its delta (refill, subtract, cap at
        capacity, write), all under one round of locks; by the C core where it is built."""
        core = self._core
        evicted = core.settle(items, now_ms) if core is not None else \
            self._settle_records_py(items, now_ms)
        if evicted:
            _warn_evicted(self.ways)

    def _settle_records_py(self, items: Sequence[tuple[Records, int]], now_ms: float) -> int:
        """``settle_records`` in Python (the reference the C core's settlement is held to):
        limits.settle on the slots directly, as _take_py does take_all."""
        stripes_n = self.stripes
        stripes = sorted({r[1] % stripes_n for records, _ in items for r in records})
        if not stripes:
            return 0
        buf = self._buf
        self._lock(stripes)
        try:
            for records, delta in items:
                taken: list[int] = []
                for key, scope, capacity, per_minute, _ in records:
                    off, live = self._slot(key, scope % stripes_n, now_ms, taken)
                    taken.append(off)
                    cap = float(capacity)
                    rate = per_minute / 60_000.0
                    left = min(cap, _level(buf, off, live, cap, rate, now_ms) - delta)
                    _put(buf, off, key, left, cap, rate, now_ms)
        finally:
            self._unlock(stripes)
        return 0  # (_slot warned of any eviction)

    def _settle_py(self, items: list[Settlement], now_ms: float) -> None:
        """``settle_many`` in Python: every item, ledgers included, under one round of locks
        (the reference the C core's settlement is held to)."""
        names = [[s.name for s in specs] + ([_ledger_name(b, p) for b, p in budgets]
                                            if budget_delta is not None else [])
                 for specs, _, budgets, budget_delta in items]
        stripes = self._stripes([n for item_names in names for n in item_names])
        if not stripes:
            return
        buf = self._buf
        self._lock(stripes)
        try:
            for (specs, delta, budgets, budget_delta), item_names in zip(items, names,
                                                                          strict=True):
                found = self._resolve(item_names, now_ms)
                # limits.settle on the slots directly (as _take does for take_all; the model
                # test holds both to the pure functions): refill, correct, clamp, write.
                for s, (key, off, live) in zip(specs, found, strict=False):
                    cap = float(s.capacity)
                    rate = s.per_minute / 60_000.0
                    left = min(cap, _level(buf, off, live, cap, rate, now_ms) - delta)
                    _put(buf, off, key, left, cap, rate, now_ms)
                if budget_delta is not None:
                    for (b, _), (key, off, live) in zip(budgets, found[len(specs):],
                                                        strict=True):
                        self._write_ledger(key, off, b, self._ledger(off, live), *budget_delta,
                                           now_ms)
        finally:
            self._unlock(stripes)

    def bucket(self, name: str, now_ms: float) -> BucketState | None:
        """One bucket's state as last charged (None: absent or full again)."""
        stripes = self._stripes([name])
        self._lock(stripes)
        try:
            (_, off, live), = self._resolve([name], now_ms)
            if not live:
                return None
            _, _, tokens, at, _ = _SLOT.unpack_from(self._buf, off)
            return BucketState(tokens, at)
        finally:
            self._unlock(stripes)

    def used(self, budget: Budget, period: str, now_ms: float) -> dict[str, int]:
        name = _ledger_name(budget, period)
        stripes = self._stripes([name])
        self._lock(stripes)
        try:
            (_, off, live), = self._resolve([name], now_ms)
            return self._ledger(off, live)
        finally:
            self._unlock(stripes)

    def close(self) -> None:
        self._buf.release()
        if isinstance(self._keep, shared_memory.SharedMemory):
            self._keep.close()


def _level(buf: memoryview, off: int, live: bool, cap: float, rate: float,
           now_ms: float) -> float:
    """A bucket's tokens now: what its slot holds, refilled since it was written, capped
    (limits.level on the slot; a dead slot is a full bucket)."""
    if not live:
        return cap
    _, _, tokens, at, _ = _SLOT.unpack_from(buf, off)
    return min(cap, tokens + max(0.0, now_ms - at) * rate)


def _put(buf: memoryview, off: int, key: int, left: float, cap: float, rate: float,
         now_ms: float) -> None:
    """Write a bucket's slot whole: its level as of now, and when it is full again (the
    slot's expiry)."""
    full_at = now_ms + (cap - left) / rate if rate > 0 else math.inf
    buf[off:off + _SLOT.size] = _SLOT.pack(key, full_at, left, now_ms, 0.0)


def _hash64(text: str) -> int:
    """8 bytes of BLAKE2b of ``text`` (a record's name's: its key, 0 standing for a slot never
    used, is 1 instead; its scope's: its stripe, modulo the stripes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_ADMITTED_UNLIMITED = Verdict(True, None, 0, 0, 0)  # no bucket applies (never mutated)


def _warn_evicted(ways: int) -> None:
    log.warning("bucket segment: all %d ways of a stripe hold live records; evicting one "
                "(more live keys than the segment holds)", ways)


def _ledger_name(b: Budget, period: str) -> str:
    return f"ledger:{b.scope}:{period}"
