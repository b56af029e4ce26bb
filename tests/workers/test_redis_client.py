"""The hot-path Redis client and the admission script against a real redis-server."""

from __future__ import annotations

import asyncio
import enum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apirouter.keys import KeyRecord, Tier
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
from workers.admission import Admission


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
    proto.transport = real
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
                  lambda t: (b"+%s\r\n" % t.encode(), t))),
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
