"""Writes of one loop turn go out together, in order, at the end of the turn (real sockets)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import uvloop

from workers.turn_writes import TurnWrites, turn_writes

HOST = "127.0.0.1"


async def _pair() -> tuple[asyncio.Server, asyncio.StreamReader, asyncio.Transport]:
    """A listening server whose first connection's reader we return, and our transport to it."""
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result(r)

    server = await asyncio.start_server(on_conn, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, HOST, port)
    return server, await accepted, transport  # type: ignore[return-value]


def _under_load() -> TurnWrites:
    """The running loop's queue, as when several requests are being answered: writes wait
    for the end of the turn."""
    writes = turn_writes(asyncio.get_running_loop())
    writes.serving = 2
    return writes


async def test_writes_wait_for_the_end_of_the_turn_and_keep_their_order() -> None:
    server, reader, transport = await _pair()
    writes = _under_load()
    assert writes is turn_writes(asyncio.get_running_loop())  # one queue per loop
    writes.write(transport, b"one ")
    writes.write(transport, b"two ")
    # Nothing has been handed to the socket yet: it goes once this turn's callbacks have run.
    assert transport.get_write_buffer_size() == 0
    assert writes._pending
    writes.write(transport, b"three\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"one two three\n"
    assert not writes._pending
    transport.close()
    server.close()


async def test_flush_before_close_delivers_what_was_queued() -> None:
    server, reader, transport = await _pair()
    writes = _under_load()
    writes.write(transport, b"last words")
    writes.flush()  # what a protocol does before it closes its transport
    transport.close()
    assert await asyncio.wait_for(reader.read(), 5) == b"last words"
    server.close()


async def test_a_write_for_a_closed_transport_is_dropped() -> None:
    server, reader, transport = await _pair()
    writes = _under_load()
    writes.write(transport, b"never sent")
    transport.close()  # closed without flushing: the queued bytes are dropped, no error
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.sleep(0)
    assert not writes._pending
    server.close()


async def test_a_lone_request_writes_at_once() -> None:
    server, reader, transport = await _pair()
    writes = turn_writes(asyncio.get_running_loop())
    writes.serving = 1
    writes.write(transport, b"now\n")  # nothing could join it this turn: no wait
    assert not writes._pending
    assert await asyncio.wait_for(reader.readline(), 5) == b"now\n"
    writes.serving = 2
    writes.write(transport, b"queued ")
    writes.serving = 1
    writes.write(transport, b"behind it\n")  # something is queued: it waits its turn too
    assert writes._pending
    assert await asyncio.wait_for(reader.readline(), 5) == b"queued behind it\n"
    transport.close()
    server.close()


def test_a_loop_is_not_kept_alive_by_its_queue() -> None:
    """The queue is the loop's value in a WeakKeyDictionary: it must not hold its loop
    strongly, or no loop that ever wrote through it (one per test here) is ever freed."""
    for new_loop in (asyncio.new_event_loop, uvloop.new_event_loop):
        loop = new_loop()

        async def write_through_the_queue() -> None:
            server, reader, transport = await _pair()
            turn_writes(asyncio.get_running_loop()).write(transport, b"through the queue\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"through the queue\n"
            transport.close()
            server.close()
            await server.wait_closed()

        loop.run_until_complete(write_through_the_queue())
        loop.close()
        gone = weakref.ref(loop)
        del loop
        gc.collect()
        assert gone() is None, f"{new_loop.__module__}: the closed loop is still alive"


async def test_a_failing_write_costs_the_others_nothing() -> None:
    server_a, reader_a, transport_a = await _pair()
    server_b, reader_b, transport_b = await _pair()
    writes = _under_load()
    transport_a.write_eof()  # a write after this raises in the flush (not closing, yet)
    writes.write(transport_a, b"after eof")
    writes.write(transport_b, b"still delivered")
    assert await asyncio.wait_for(reader_b.readexactly(15), 5) == b"still delivered"
    assert await asyncio.wait_for(reader_a.read(), 5) == b""  # aborted, nothing sent
    assert transport_a.is_closing()
    transport_b.close()
    server_a.close()
    server_b.close()
