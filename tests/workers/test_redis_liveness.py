"""Against a real redis-server: a late reply is honoured, a silent Redis is declared down after
the stall timeout (and a blocked event loop is not mistaken for it), and a release of an
admission decided without Redis's answer leaves no charge, whichever runs first."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
import uvloop

from apirouter.budgets import Budget, Reservation
from apirouter.keys import KeyRecord, Tier
from apirouter.redis_client import RedisClient, RedisUnavailable
from apirouter.table import Limits
from tests.harness import RedisServer
from workers.admission import Admission, Ticket
from workers.admission_scripts import ADMIT_LUA, RELEASE_LUA


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    os.kill(server.pid, signal.SIGCONT)
    server.stop()
    server.cleanup()


def test_a_late_reply_is_honoured_and_a_blocked_loop_is_not_an_outage(
        own_redis: RedisServer) -> None:
    async def scenario() -> None:
        client = RedisClient(own_redis.url, stall_timeout=0.2)
        other = RedisClient(own_redis.url)
        assert await client.execute("PING", timeout=None) == "PONG"
        # Redis pauses for 150 ms: later than any one event-loop turn, within the bound.
        await other.execute("CLIENT", "PAUSE", 150, "ALL", timeout=1)
        assert await client.execute("SET", "lv:k", "1", timeout=None) == "OK"
        # Our own loop blocked (in another connection's callback) for 3x the bound while
        # Redis answered within it: not an outage. uvloop runs due timers before it reads
        # sockets, so the watchdog must look at the socket itself.
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()

        class Busy(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                time.sleep(0.6)

        transport, _ = await loop.connect_accepted_socket(Busy, mine)
        await other.execute("CLIENT", "PAUSE", 50, "ALL", timeout=1)
        fut = asyncio.ensure_future(client.execute("INCR", "lv:n", timeout=None))
        await asyncio.sleep(0)
        theirs.send(b"x")
        assert await fut == 1
        transport.close()
        theirs.close()
        client.close()
        other.close()

    uvloop.run(scenario())


async def test_a_silent_redis_is_down_after_the_stall_timeout(own_redis: RedisServer) -> None:
    client = RedisClient(own_redis.url, stall_timeout=0.2)
    assert await client.execute("PING", timeout=None) == "PONG"
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        calls = [asyncio.ensure_future(client.execute("PING", timeout=None)) for _ in range(5)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert "no reply" in str(results[0])
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert await client.execute("PING", timeout=None) == "PONG"  # a new connection
    client.close()


def test_a_silent_redis_is_down_on_time_while_traffic_keeps_queuing(
        own_redis: RedisServer) -> None:
    """Requests keep arriving while Redis is stopped: each queues a command behind the
    unanswered ones. The stall clock must keep running for those already sent (once, the
    commands a turn queued before the watchdog ran restarted it, and with steady traffic Redis
    was never declared down)."""
    async def scenario() -> None:
        client = RedisClient(own_redis.url, stall_timeout=0.2)
        assert await client.execute("PING", timeout=None) == "PONG"
        loop = asyncio.get_running_loop()
        os.kill(own_redis.pid, signal.SIGSTOP)
        first = asyncio.ensure_future(client.execute("PING", timeout=None))
        await asyncio.sleep(0)
        later: list[asyncio.Future[object]] = []

        def arrive() -> None:  # a request each loop turn, as under steady load
            if not first.done():
                later.append(asyncio.ensure_future(client.execute("PING", timeout=None)))
                loop.call_soon(arrive)

        loop.call_soon(arrive)
        try:
            # Well past the 0.2 s bound; on the broken watchdog this waited forever.
            with pytest.raises(RedisUnavailable, match="no reply"):
                await asyncio.wait_for(first, 5)
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        results = await asyncio.gather(*later, return_exceptions=True)
        # Those sent on the stalled connection failed with it; the last few, which had not
        # started before Redis was resumed, got their answer on a new connection.
        assert any(isinstance(r, RedisUnavailable) for r in results)
        assert all(isinstance(r, RedisUnavailable) or r == "PONG" for r in results), results
        client.close()

    uvloop.run(scenario())


def _limits(url: str) -> Limits:
    return Limits(1 << 20, 30.0, 1.0, 8, 30.0, 3, url, 500.0, "closed", 256, 1)


async def test_release_is_idempotent_and_blocks_a_late_admission(own_redis: RedisServer) -> None:
    key = KeyRecord("lv-key", "b" * 64, "lv-org", "", frozenset({"inference"}), "t",
                    Tier(1, 10, 0, 0), False)
    budget = Budget("org:lv-org", "day", -1, -1, 100)
    admission = Admission()
    lim = _limits(own_redis.url)
    client = admission.client_for(lim)
    assert client is not None

    async def run(name: str, source: str, ticket: Ticket) -> object:
        return await admission._script(client, name, source, *admission._script_args(
            ticket, None, 0))

    async def used() -> tuple[int, int]:
        t = await admission.admit(lim, key, "m", 1, None, None, budgets=[budget],
                                  reservation=Reservation(0, 1, 1))
        assert t.verdict.allowed
        level = t.verdict.remaining + 1  # before this probe took one
        row = await client.execute("HGET", f"apirouter:budget:{{lv-org}}:org:lv-org:"
                                           f"{t.periods[0]}", "requests", timeout=None)
        assert isinstance(row, bytes)
        return 10 - level, int(row) - 1

    first = await admission.admit(lim, key, "m", 1, None, None, budgets=[budget],
                                  reservation=Reservation(0, 1, 1))
    assert first.verdict.allowed and first.verdict.remaining == 9
    # Released (its answer "never arrived"): refunded once, however often the release runs.
    assert await run("release", RELEASE_LUA, first) == 1
    assert await run("release", RELEASE_LUA, first) == 0
    assert await used() == (0, 0)
    # A release that reaches Redis before its admission: the admission charges nothing.
    late = Ticket(key, first.specs, 1, first.verdict, [budget], Reservation(0, 1, 1),
                  rid="never-seen", periods=first.periods)
    assert await run("release", RELEASE_LUA, late) == 0
    assert await run("admit", ADMIT_LUA, late) == [3, 0, 0, 0, 0]
    assert await used() == (1, 1)  # only the probe of the line above
    client.close()


async def test_fail_closed_refusal_during_a_stall_is_released(own_redis: RedisServer) -> None:
    from apirouter.errors import RouterError

    key = KeyRecord("lv-fc", "c" * 64, "lv-org", "", frozenset({"inference"}), "t",
                    Tier(1, 10, 0, 0), False)
    admission = Admission()
    lim = _limits(own_redis.url)
    assert (await admission.admit(lim, key, "m", 1, None, None)).verdict.remaining == 9
    os.kill(own_redis.pid, signal.SIGSTOP)
    try:
        outcomes = await asyncio.gather(*(admission.admit(lim, key, "m", 1, None, None)
                                          for _ in range(4)), return_exceptions=True)
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    assert all(isinstance(o, RouterError) and o.code == "SERVICE_UNAVAILABLE"
               for o in outcomes), outcomes
    assert admission.status(lim)["releases_pending"] == 4
    deadline = time.monotonic() + 10
    while admission.status(lim)["releases_pending"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert admission.status(lim)["releases_pending"] == 0
    # The four refused admissions ran inside Redis after SIGCONT or not at all: no charge.
    ticket = await admission.admit(lim, key, "m", 1, None, None)
    assert ticket.verdict.allowed and ticket.verdict.remaining == 8
