"""The hot-path Redis client and the admission script against a real redis-server."""

from __future__ import annotations

import asyncio
import enum
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketSpec, Verdict
from apirouter.redis_client import (
    RedisClient,
    RedisError,
    RedisUnavailable,
    _NeedMore,
    encode_command,
    parse_reply,
)
from apirouter.table import Limits
from tests.harness import RedisServer
from workers.admission import Admission, Ticket, finish_pending
from workers.admission_scripts import (
    BUCKET_TTL_MS,
    BUCKET_TTL_REFRESH_MS,
    LEVEL_LUA,
    SETTLE_LUA,
    bucket_fields,
    bucket_place,
    level_address,
)


def bucket(org: str, name: str) -> tuple[str, str, str]:
    """A bucket's hash key, level field and time field."""
    return (bucket_place(org, name)[0], *bucket_fields(name))


def limits(url: str, policy: str = "open") -> Limits:
    return Limits(1 << 20, 30.0, 1.0, 8, 30.0, 3, url, 50.0, policy, 256, 1)


async def test_commands_pipelining_and_errors(redis_server: RedisServer) -> None:
    client = RedisClient(redis_server.url)
    assert await client.execute("SET", "rc:k", "v", timeout=1) == "OK"
    assert await client.execute("GET", "rc:k", timeout=1) == b"v"
    results = await asyncio.gather(*(client.execute("INCR", "rc:n", timeout=1)
                                     for _ in range(200)))
    assert sorted(results) == list(range(1, 201))  # pipelined on one connection, in order
    assert isinstance(await client.execute("NOSUCHCOMMAND", timeout=1), RedisError)
    assert await client.execute("EVAL", "return {1, 'a', {2}}", 0, timeout=1) == [1, b"a", [2]]
    client.close()


async def test_a_checked_pipeline_counts_every_reply_and_returns_the_first_error(
        redis_server: RedisServer) -> None:
    """pipeline_checked takes its +OK and nil replies a run at a time (_Tally): the replies
    of other kinds among them, and the calls after it, still get theirs."""
    client = RedisClient(redis_server.url)
    key = f"rc:checked:{random.random()}"
    commands = [("SET", key, "v", "EX", 60, "NX"), ("SET", key, "w", "EX", 60, "NX"),
                ("INCR", key), ("GET", key), ("SET", key + "2", "v", "EX", 60, "NX"),
                ("HSET", key, "f", "1"), ("SET", key + "3", "v", "EX", 60, "NX")]
    data = b"".join(encode_command(*c) for c in commands)
    assert await client.execute("PING", timeout=1) == "PONG"  # (connected)
    checked = asyncio.ensure_future(client.pipeline_checked(data, len(commands), 1))
    later = asyncio.ensure_future(client.execute("GET", key + "3", timeout=1))
    error = await checked
    assert isinstance(error, RedisError) and "not an integer" in str(error)  # INCR's, first
    assert await later == b"v"
    assert await client.pipeline_checked(data[:len(encode_command(*commands[0]))], 1, 1) is None
    client.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"+OK\r\n", b"$-1\r\n", b"-ERR x\r\n", b":5\r\n",
                                 b"$1\r\nv\r\n", b"+QUEUED\r\n"]), min_size=1, max_size=12),
       st.lists(st.sampled_from([b"+OK\r\n", b"$-1\r\n"]), max_size=4), st.data())
def test_a_checked_pipeline_reads_its_replies_however_they_are_split(
        replies: list[bytes], nexts: list[bytes], data: st.DataObject) -> None:
    """However the bytes arrive, a _Tally takes exactly its replies (the next waiters get
    theirs, in order) and reports the first error."""
    from apirouter.redis_client import _Protocol, _Tally

    class Client:
        _loop = asyncio.new_event_loop()
        stall_timeout = None
        lone = None
        _proto = None

    proto = _Protocol(Client())  # type: ignore[arg-type]
    fut = Client._loop.create_future()
    proto.owe([_Tally(fut, len(replies))] * len(replies))
    others = [Client._loop.create_future() for _ in nexts]
    proto.owe(others)
    stream = b"".join(replies + nexts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if b > a:
            proto.data_received(stream[a:b])
    first = next((r for r in replies if r.startswith(b"-")), None)
    got = fut.result()
    assert (got is None) if first is None else str(got) == "ERR x"
    assert [f.result() for f in others] == [None if r == b"$-1\r\n" else "OK" for r in nexts]
    assert not proto.waiters and proto.buf == b""
    Client._loop.close()


async def test_commands_of_one_loop_turn_go_out_in_one_write(redis_server: RedisServer) -> None:
    client = RedisClient(redis_server.url)
    assert await client.execute("PING", timeout=1) == "PONG"
    proto = client._proto
    assert proto is not None and proto.transport is not None
    writes: list[bytes] = []
    real = proto.transport

    class Counting:  # the transport, counting its writes
        def write(self, data: bytes) -> None:
            writes.append(data)
            real.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    proto.transport = Counting()  # type: ignore[assignment]
    results = await asyncio.gather(*(client.execute("INCR", "rc:turn", timeout=1)
                                     for _ in range(100)))
    assert sorted(results) == list(range(1, 101))  # every reply, in order
    # The first found the connection idle and went at once; the 99 behind it, one write.
    assert [w.count(b"INCR") for w in writes] == [1, 99]
    # Not alone (other requests are being served): the first waits for the others' write too.
    client.lone = lambda: False
    writes.clear()
    await client.execute("PING", timeout=1)
    writes.clear()
    results = await asyncio.gather(*(client.execute("INCR", "rc:turn", timeout=1)
                                     for _ in range(100)))
    assert sorted(results) == list(range(101, 201))
    assert [w.count(b"INCR") for w in writes] == [100]
    proto.transport = real
    client.close()


async def test_a_command_encoded_at_the_turns_write_keeps_its_place(
        redis_server: RedisServer) -> None:
    """submit_later: alone on an idle connection the command is encoded and written at once;
    with replies owed it is encoded when the turn's commands are written, in its place among
    them, with what was added for it in the meantime."""
    client = RedisClient(redis_server.url, stall_timeout=5)
    key = f"rc:later:{random.random()}"
    assert await client.execute("SET", key, 1, timeout=1) == "OK"
    loop = asyncio.get_running_loop()
    alone = loop.create_future()
    encoded: list[str] = []

    def incr_by(amounts: list[int]) -> bytes:
        encoded.append(key)
        return encode_command("INCRBY", key, sum(amounts))

    assert client.submit_later(lambda: incr_by([1]), alone)
    assert encoded == [key]  # at once
    assert await alone == 2
    first = client.submit("SET", key, 10)
    amounts = [1]
    later = loop.create_future()
    assert client.submit_later(lambda: incr_by(amounts), later)
    last = client.submit("INCR", key)
    amounts += [5, 100]  # the same turn: goes with it
    assert len(encoded) == 1  # not yet
    assert first is not None and last is not None
    assert [await first, await later, await last] == ["OK", 116, 117]
    client.close()


async def test_a_command_that_cannot_be_encoded_fails_the_connection_not_the_order(
        redis_server: RedisServer) -> None:
    """submit_later's encoder raising at the turn's write (a bug of ours): its waiter and the
    turn's others are failed, the connection given up (never a write whose replies would go
    to the wrong waiters), and the next command runs on a new connection."""
    client = RedisClient(redis_server.url, stall_timeout=5)
    assert await client.execute("PING", timeout=1) == "PONG"
    loop = asyncio.get_running_loop()
    first = client.submit("PING")

    def broken() -> bytes:
        raise ValueError("no")

    later = loop.create_future()
    assert client.submit_later(broken, later)
    last = client.submit("PING")
    assert first is not None and last is not None
    for fut in (first, later, last):
        with pytest.raises(RedisUnavailable, match="could not be encoded"):
            await fut
    assert await client.execute("PING", timeout=1) == "PONG"
    client.close()


async def test_unreachable_redis_fails_fast() -> None:
    client = RedisClient("redis://127.0.0.1:9/0")
    with pytest.raises(RedisUnavailable):
        await client.execute("PING", timeout=0.2)


def test_encoding() -> None:
    assert encode_command("SET", b"k", 1) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n"


def _reference_bulk(a: bytes | str | int | float) -> bytes:
    b = (a if isinstance(a, bytes) else a.encode() if isinstance(a, str) else
         repr(a).encode() if isinstance(a, float) else str(a).encode())
    return b"$%d\r\n%s\r\n" % (len(b), b)


class _Color(str, enum.Enum):  # noqa: UP042 - str() is "_Color.RED", not its value
    RED = "red"


_ARGS = st.one_of(st.binary(max_size=40), st.text(max_size=20), st.integers(),
                  st.floats(allow_nan=False), st.booleans(), st.sampled_from([_Color.RED]),
                  st.sampled_from(["EVALSHA", "rl:{acme}:key:k1:rpm", 1, 1.0, True, 0, -1]))


@given(st.lists(st.lists(_ARGS, min_size=1, max_size=12), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_encoding_matches_the_reference_whatever_the_cache_holds(
        commands: list[list[bytes | str | int | float]]) -> None:
    # the encoder keeps encodings by value; 1, 1.0 and True are equal keys and must not mix
    for args in commands + commands:
        want = b"*%d\r\n" % len(args) + b"".join(_reference_bulk(a) for a in args)
        assert encode_command(*args) == want


_RESP = st.recursive(
    st.one_of(st.integers(-2**63, 2**63 - 1).map(lambda i: (b":%d\r\n" % i, i)),
              st.binary(max_size=30).map(lambda b: (b"$%d\r\n%s\r\n" % (len(b), b), b)),
              st.just((b"$-1\r\n", None)), st.just((b"*-1\r\n", None)),
              st.from_regex(r"[a-zA-Z0-9 ]{0,12}", fullmatch=True).map(
                  lambda t: (b"+%s\r\n" % t.encode(), t)),
              # an admission's reply (five integers: parsed by a fast path of its own)
              st.lists(st.integers(-2**63, 2**63 - 1), min_size=5, max_size=5).map(
                  lambda xs: (b"*5\r\n" + b"".join(b":%d\r\n" % x for x in xs), xs))),
    lambda inner: st.lists(inner, max_size=6).map(
        lambda xs: (b"*%d\r\n" % len(xs) + b"".join(x[0] for x in xs), [x[1] for x in xs])),
    max_leaves=20)


@given(st.lists(_RESP, min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_replies_parse_whole_and_every_partial_prefix_asks_for_more(
        replies: list[tuple[bytes, object]]) -> None:
    buf = b"".join(r[0] for r in replies)
    pos = 0
    for raw, value in replies:
        got, nxt = parse_reply(buf, pos)
        assert got == value and nxt == pos + len(raw)
        pos = nxt
    first = replies[0][0]
    for cut in range(len(first)):
        with pytest.raises(_NeedMore):
            parse_reply(first[:cut], 0)


async def test_admission_script_is_exact(redis_server: RedisServer) -> None:
    key = KeyRecord("rc-key", "b" * 64, "rc-org", "", frozenset({"inference"}), "t",
                    Tier(1, 10, 0, 0), False)
    admission = Admission()
    lim = limits(redis_server.url)
    verdicts = await asyncio.gather(*(admission.admit(lim, key, "m", 5, None, None)
                                      for _ in range(30)))
    allowed = [t for t in verdicts if t.verdict.allowed]
    assert len(allowed) == 10  # burst 10, refill 1/min: exactly the burst
    denied = next(t for t in verdicts if not t.verdict.allowed)
    assert denied.verdict.failed is not None and denied.verdict.failed.name == "key:rc-key:rpm"
    assert 0 < denied.verdict.retry_after_ms <= 60_000
    assert admission.status(lim)["status"] == "ok"


async def test_replayed_nonce_is_refused(redis_server: RedisServer) -> None:
    from apirouter.errors import RouterError

    key = KeyRecord("rc-nonce", "c" * 64, "rc-org", "", frozenset({"inference"}), "t",
                    Tier(100, 100, 0, 0), False)
    admission = Admission()
    lim = limits(redis_server.url)
    assert (await admission.admit(lim, key, "m", 1, None, None, "n-1", 60_000)).verdict.allowed
    with pytest.raises(RouterError) as e:
        await admission.admit(lim, key, "m", 1, None, None, "n-1", 60_000)
    assert e.value.code == "INVALID_REQUEST" and "replay" in e.value.message


async def test_queued_settlements_are_sent_when_settled_not_a_loop_iteration_later(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accounting flush queues the settlements of its turn and settles them at its end:
    they go to Redis then, with nothing scheduled for a later iteration of the loop (which
    polled for I/O first: one system call and a loop turn a request at c=1)."""
    lim = limits(redis_server.url)
    client = RedisClient(redis_server.url, stall_timeout=5)
    spec = BucketSpec("key:held:tpm", 1000, 0, 0)
    hkey, level_field, ts_field = bucket("rc-held", spec.name)
    await client.execute("HSET", hkey, level_field, 500, ts_field, 0, timeout=5)
    admission = Admission()
    admission.client_for(lim)
    key = KeyRecord("rc-held", "e" * 64, "rc-held", "", frozenset({"inference"}), "t",
                    Tier(0, 0, 0, 0), False)
    # A first turn's settlement: it loads the script (in a task).
    admission.queue_settlement(lim, Ticket(key, [spec], 1000, Verdict(True, None, 0, 0, 0)), 1070,
                          None)
    await finish_pending(admission, 10)
    loop = asyncio.get_running_loop()
    scheduled: list[object] = []  # what is left for a later iteration (still run)
    call_soon = loop.call_soon
    monkeypatch.setattr(loop, "call_soon",
                        lambda cb, *a, **k: (scheduled.append(cb), call_soon(cb, *a, **k))[1])
    for delta in (100, -30):  # used 1100 of the 1000 reserved, then 970
        admission.queue_settlement(lim, Ticket(key, [spec], 1000, Verdict(True, None, 0, 0, 0)),
                              1000 + delta, None)
    assert scheduled == [] and len(admission._redis_settlements) == 2  # queued
    admission.settle_queued()
    assert scheduled == [] and admission._redis_settlements == []  # sent, not scheduled
    monkeypatch.undo()
    await finish_pending(admission, 10)
    level = await client.execute("HGET", hkey, level_field, timeout=5)
    assert isinstance(level, bytes) and float(level) == 360  # 500 - 70 - 100 + 30
    client.close()
    if admission.redis is not None:
        admission.redis.close()


async def test_one_turns_settlements_go_in_one_call_as_if_one_by_one(
        redis_server: RedisServer) -> None:
    """A turn's token-bucket settlements (here 305, over 3 calls of SETTLE_MANY_MAX) land
    exactly as the one-bucket script run once per settlement, in order, leaves them: charges
    going negative, refunds clamped at capacity (the last five refund past it). 40 buckets, ~8
    settlements each, so that every settlement shows in some bucket's end value; rate 0 keeps
    that value independent of time."""
    rng = random.Random(1129)
    specs = [BucketSpec(f"key:s{i}:tpm", rng.randint(10, 1000), 0, 0) for i in range(40)]
    settlements = [(rng.randrange(40), rng.randint(-300, 300)) for _ in range(300)]
    settlements += [(i, -5000) for i in range(5)]
    lim = limits(redis_server.url)
    client = RedisClient(redis_server.url, stall_timeout=5)
    start = [rng.randint(-500, s.capacity) for s in specs]
    for org in ("rc-seq", "rc-many"):
        for s, t in zip(specs, start, strict=True):
            hkey, level_field, ts_field = bucket(org, s.name)
            await client.execute("HSET", hkey, level_field, t, ts_field, 0, timeout=5)
    sha = await client.execute("SCRIPT", "LOAD", SETTLE_LUA, timeout=5)
    for i, delta in settlements:  # the reference: one call per settlement
        s = specs[i]
        assert await client.execute("EVALSHA", sha, 1, bucket("rc-seq", s.name)[0],
                                    s.capacity, s.per_minute, delta, BUCKET_TTL_MS,
                                    timeout=5) == 1
    admission = Admission()
    admission.client_for(lim)  # as the admissions of these tickets did
    key = KeyRecord("rc-many", "d" * 64, "rc-many", "", frozenset({"inference"}), "t",
                    Tier(0, 0, 0, 0), False)
    for i, delta in settlements:  # one turn: queued together, sent as SETTLE_MANY calls
        ticket = Ticket(key, [specs[i]], 1000, Verdict(True, None, 0, 0, 0))
        admission.queue_settlement(lim, ticket, 1000 + delta, None)
    await finish_pending(admission, 10)
    for s in specs:
        seq = await client.execute("HGET", *bucket("rc-seq", s.name)[:2], timeout=5)
        many = await client.execute("HGET", *bucket("rc-many", s.name)[:2], timeout=5)
        assert seq == many, s.name
    client.close()
    if admission.redis is not None:
        admission.redis.close()


async def test_a_bucket_hash_lives_its_ttl_past_every_write_with_few_expiry_writes(
        redis_server: RedisServer) -> None:
    """A key's rpm and tpm buckets are fields of one hash, whose expiry is set by the write
    that finds it set over BUCKET_TTL_REFRESH_MS ago ('ttl_set'), to BUCKET_TTL_MS + that from
    then: the writes in between leave it, and the hash still lives BUCKET_TTL_MS past each of
    them; a refusal leaves no reservation record."""
    client = RedisClient(redis_server.url, stall_timeout=5)
    key = KeyRecord("rc-ttl", "f" * 64, "rc-ttl", "", frozenset({"inference"}), "t",
                    Tier(100, 100, 6000, 6000), False)
    hkey = bucket_place("rc-ttl", "key:rc-ttl:rpm")[0]
    assert bucket_place("rc-ttl", "key:rc-ttl:tpm")[0] == hkey
    admission = Admission()
    lim = limits(redis_server.url)

    async def admit() -> Ticket:
        ticket = await admission.admit(lim, key, "m", 10, None, None)
        assert ticket.verdict.allowed
        return ticket

    async def state() -> tuple[int, int]:
        e = await client.execute("HGET", hkey, "ttl_set", timeout=5)
        ttl = await client.execute("PTTL", hkey, timeout=5)
        assert isinstance(e, bytes) and isinstance(ttl, int)
        return int(e), ttl

    await admit()
    fields = await client.execute("HGETALL", hkey, timeout=5)
    assert sorted(fields[::2]) == [b"rpm", b"rpm_ts", b"tpm", b"tpm_ts", b"ttl_set"]
    e, ttl = await state()
    full = BUCKET_TTL_MS + BUCKET_TTL_REFRESH_MS
    assert full - 1000 < ttl <= full
    await admit()  # within the period: the expiry is left as it is
    assert (await state())[0] == e
    # Its expiry set longer ago than the period: the next write sets it again.
    await client.execute("HSET", hkey, "ttl_set", e - BUCKET_TTL_REFRESH_MS - 1, timeout=5)
    await client.execute("PEXPIRE", hkey, BUCKET_TTL_MS - 1, timeout=5)
    await admit()
    e2, ttl = await state()
    assert e2 >= e and full - 1000 < ttl <= full
    # Ahead of Redis's clock (another server's time): set again too.
    await client.execute("HSET", hkey, "ttl_set", e2 + 10 * BUCKET_TTL_REFRESH_MS, timeout=5)
    await admit()
    assert (await state())[0] <= e2 + 1000
    # A settlement (SETTLE_MANY) follows the same rule.
    await client.execute("HSET", hkey, "ttl_set", e2 - BUCKET_TTL_REFRESH_MS - 1, timeout=5)
    await client.execute("PEXPIRE", hkey, BUCKET_TTL_MS - 1, timeout=5)
    admission.queue_settlement(lim, await admit(), 5, None)
    await finish_pending(admission, 10)
    e3, ttl = await state()
    assert e3 >= e2 and full - 1000 < ttl <= full
    # A refusal (the rpm bucket emptied) leaves no record of its reservation, and the tpm
    # bucket uncharged.
    await client.execute("HSET", hkey, "rpm", "0.5", timeout=5)
    tpm = await client.execute("HGET", hkey, "tpm", timeout=5)
    refused = await admission.admit(lim, key, "m", 1, None, None)
    assert not refused.verdict.allowed and refused.verdict.failed is not None
    assert refused.verdict.failed.name == "key:rc-ttl:rpm"
    assert await client.execute("EXISTS", f"apirouter:res:{{rc-ttl}}:{refused.rid}",
                                timeout=5) == 0
    assert await client.execute("HGET", hkey, "tpm", timeout=5) == tpm
    client.close()
    if admission.redis is not None:
        admission.redis.close()


async def test_level_script_reads_the_level_admission_leaves(redis_server: RedisServer) -> None:
    """LEVEL_LUA (the rate-limit gauges) reads a bucket by its hash and limit (level_address):
    the org's request bucket after three admissions, its tokens bucket after their 30 tokens."""
    client = RedisClient(redis_server.url, stall_timeout=5)
    key = KeyRecord("rc-lvl", "a" * 64, "rc-lvl", "", frozenset({"inference"}), "t",
                    Tier(0, 0, 0, 0), False)
    org = Tier(1, 100, 1, 1000)  # refill 1 a minute: nothing in the test's time
    admission = Admission()
    lim = limits(redis_server.url)
    for _ in range(3):
        assert (await admission.admit(lim, key, "m", 10, org, None)).verdict.allowed
    for name, capacity, want in (("org:rc-lvl:rpm", 100, 97), ("org:rc-lvl:tpm", 1000, 970)):
        hash_key, limit = level_address("rc-lvl", name)
        level = await client.execute("EVAL", LEVEL_LUA, 1, hash_key, limit,
                                     capacity, repr(1 / 60000), timeout=5)
        assert isinstance(level, bytes) and abs(float(level) - want) < 0.1, (name, level)
    client.close()
    if admission.redis is not None:
        admission.redis.close()
