"""Streams (``stream: true``): hold the head until the first event, then relay event by event.

Where a stream is held and released:

1. ``hold`` is the forwarding attempt for a stream (workers.forwarding runs it per candidate):
   it sends the request, waits for the backend's status and its first event under the
   backend's first-event deadline, and keeps them. Nothing has reached the client, so a
   backend that refuses, errors, hangs up or times out before its first event fails over to
   the next candidate invisibly.
2. ``relay`` commits: it sends the response head and the held events to the client (the first
   byte), then passes on the whole events each read from the backend completes, in one write
   per read - their exact bytes, found by apirouter.sse's SSERelay without parsing the JSON
   and without an object per event in the common case - awaiting the client's socket between
   writes (a slow reader
   pauses the backend read: workers.upstream's BodyStream stops reading past its high-water
   mark). While the client's socket takes every write at once, a read is relayed inside the
   backend connection's callback (``_Push``), without waking the relay task; the task takes
   over whenever a write has to wait. From here on the backend is never switched.
3. A stream the backend cuts, stalls past the idle timeout, or ends without ``[DONE]`` ends for
   the client with an in-band error event (OpenAI's error shape: the openai SDK raises
   APIError) and is accounted as STREAM_INTERRUPTED, against the backend. A client that hangs
   up cancels the relay: the backend connection is closed (not pooled) and what was streamed
   so far is settled. So does a client that never reads: the lean server disconnects it
   once its socket stayed full for the client timeout (workers.fast_server).

Usage: the backend is always asked for its usage chunk (apirouter.validation); the chunk is
passed on only if the client asked; without one, usage is estimated from what was streamed
and the record says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apirouter.errors import RouterError
from apirouter.outcomes import CLIENT_GONE, INTERRUPTED, SUCCESS
from apirouter.sse import (
    SSEEvent,
    SSEEventTooLarge,
    SSERelay,
    SSEScanner,
    StreamUsage,
    block_events,
    error_event,
)
from workers.context import RequestContext, Sink
from workers.endpoints import ms
from workers.metrics import STREAMS_INTERRUPTED, TIME_TO_FIRST_TOKEN
from workers.table_view import BackendTarget
from workers.upstream import (
    STREAM_HIGH_WATER,
    BodyStream,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from apirouter._ssecore import PlainChunks
    from workers.fast_server import FastProtocol
    from workers.pipeline import Pipeline

EVENT_STREAM = "text/event-stream"


@dataclass(slots=True)
class Held:
    """A stream whose status and first event are in, not yet committed to the client."""

    target: BackendTarget
    body: BodyStream
    data: bytes  # the body so far, unparsed: the relay scans it as it scans every later read
    first_event_at: float  # perf_counter when the first event was complete


def _began_with_error(events: list[SSEEvent]) -> bool:
    return any(e.data is not None and b'"error"' in e.data and e.data.lstrip().startswith(b"{")
               and b'"choices"' not in e.data for e in events)


def _has_begun(probe: SSEScanner, chunk: bytes) -> bool:
    """Whether the stream (its reads so far fed to ``probe``, ``chunk`` the latest) has a
    complete data event; UpstreamProtocolError if one so far is an error."""
    try:
        got = probe.feed_block(chunk)  # the common case: no object per event
        if got is None:
            events = probe.feed(chunk)
        elif b'"error"' in got[0]:
            events = block_events(got[0])
        else:
            return got[1] > 0
    except SSEEventTooLarge as e:
        raise UpstreamProtocolError(str(e)) from None
    if _began_with_error(events):
        raise UpstreamProtocolError("the backend's stream began with an error event")
    return any(e.data is not None for e in events)  # comments do not count


async def hold(target: BackendTarget, data: bytes, deadline: float
               ) -> tuple[UpstreamResponse, Held | None]:
    """One attempt of a stream: its head and first event, under the first-event deadline."""
    loop = asyncio.get_running_loop()
    first_deadline = min(deadline, loop.time() + target.first_event_s)
    resp, body = await target.pool.open_stream(data, first_deadline)
    if body is None:  # an error status (or a backend that did not stream): whole, as usual
        return resp, None
    try:
        body.arm(first_deadline)
        probe = SSEScanner()
        chunks: list[bytes] = []
        begun = False
        while not begun:
            chunk = await body.read()
            if not chunk:
                raise UpstreamProtocolError("the backend ended the stream before its first event")
            chunks.append(chunk)
            begun = _has_begun(probe, chunk)
    except BaseException:
        body.close()  # not complete: the connection is closed, not pooled
        raise
    return resp, Held(target, body, b"".join(chunks), time.perf_counter())


async def relay(p: Pipeline, ctx: RequestContext, held: Held) -> None:
    """Commit the held stream to the client and pass it through to its end; account it."""
    fwd, req, sink = ctx.fwd, ctx.request, ctx.sink
    assert fwd is not None and req is not None and sink is not None
    usage = StreamUsage(len(ctx.body))
    body = held.body
    index = held.target.backend.index
    interruption: str | None = None
    ticket = ctx.ticket
    headers = [("X-Request-ID", ctx.request_id), ("X-Router-Backend", fwd.backend_id),
               ("X-Router-Decision", fwd.decision_type),
               ("X-Router-Latency-Ms", ms(time.perf_counter() - ctx.started)),
               ("Cache-Control", "no-cache")]
    if ticket is not None:
        headers += ticket.rate_limit_headers()
    try:
        try:
            await sink.start(200, headers, EVENT_STREAM)
            relayed = SSERelay(SSEScanner(), usage, req.include_usage)
            push = _Push(relayed, sink, ctx, fwd.backend_id)
            lane = _open_lane(body, relayed, sink)
            out = relayed.feed(held.data)
            body.watch_idle(held.target.idle_s)
            while True:
                if out:
                    await sink.write(out)
                    if ctx.ttft_s is None:
                        _first_event_out(ctx, fwd.backend_id)
                if relayed.done:
                    break
                try:
                    # The reads meanwhile: relayed by the lane, or else by push (the lane
                    # once the first event is out: it does not time it).
                    chunk = await body.read(push.feed, lane if ctx.ttft_s is not None else None)
                except UpstreamError:
                    # The body failed after push stopped, before this task ran (e.g. bad
                    # framing later in the same read: the connection is lost first): what
                    # push took goes out (or its error is raised) before the body's error,
                    # as when the read was returned before the next read raised.
                    if not push.stopped:
                        raise
                    await push.resume()
                    if relayed.done:
                        break
                    raise
                if push.stopped:
                    await push.resume()
                    if relayed.done:
                        break
                    out = relayed.feed(chunk) if chunk else b""
                    continue
                if not chunk:
                    interruption = "no_done"
                    break
                out = relayed.feed(chunk)
        except UpstreamTimeout:
            interruption = "idle_timeout"
        except UpstreamProtocolError:
            interruption = "cut"
        except SSEEventTooLarge:
            interruption = "event_too_large"
        if interruption is not None:
            await sink.write(error_event(RouterError(
                "STREAM_INTERRUPTED", f"the stream from the backend broke off ({interruption})",
                details=f"backend {fwd.backend_id} after {usage.events} events"),
                ctx.request_id))
        await sink.end()
    except asyncio.CancelledError:
        # The client hung up (its server cancelled us): close the backend connection now,
        # settle what was produced.
        body.close()
        _settle(p, ctx, fwd.backend_id, index, usage, "client_disconnected")
        raise
    except ConnectionError:  # the client's socket broke under a write
        body.close()
        _settle(p, ctx, fwd.backend_id, index, usage, "client_disconnected")
        return
    finally:
        body.close()
    _settle(p, ctx, fwd.backend_id, index, usage, interruption)


def _first_event_out(ctx: RequestContext, backend_id: str) -> None:
    ctx.ttft_s = time.perf_counter() - ctx.started
    TIME_TO_FIRST_TOKEN.labels(backend_id).observe(ctx.ttft_s)


class _Push:
    """The relay of the reads that arrive while ``relay`` waits in ``BodyStream.read``: each
    passed on inside the backend connection's callback (``feed``), with no future resolved
    and no task step for it, written with ``sink.write_now``. When the client's socket is
    full (``write_now`` declines), or the relay raised, or [DONE] went out, ``feed`` answers
    False: the body wakes the relay task, which ``resume``s - awaits the declined write or
    raises that error - and takes over (reads pile up in the body from then, up to its
    high-water mark, as before). Measured (bench.stream_overhead's CPU per event, 12 rounds
    rotating with the code before, same hour): 6.81 -> 5.93 µs, paired -0.84."""

    __slots__ = ("relayed", "sink", "ctx", "backend_id", "stopped", "error", "unsent")

    def __init__(self, relayed: SSERelay, sink: Sink, ctx: RequestContext,
                 backend_id: str) -> None:
        self.relayed = relayed
        self.sink = sink
        self.ctx = ctx
        self.backend_id = backend_id
        self.stopped = False
        self.error: Exception | None = None
        self.unsent = b""  # events write_now declined: the relay task writes them

    def feed(self, data: bytes) -> bool:
        """Relay one read; False when the relay task must take over."""
        relayed = self.relayed
        try:
            out = relayed.feed(data)
            if out:
                if not self.sink.write_now(out):
                    self.unsent = out
                    self.stopped = True
                    return False
                if self.ctx.ttft_s is None:
                    _first_event_out(self.ctx, self.backend_id)
        except Exception as e:  # raised in the relay task by resume()
            self.error = e
            self.stopped = True
            return False
        if relayed.done:
            self.stopped = True
            return False
        return True

    async def resume(self) -> None:
        """In the relay task, after ``feed`` stopped: raise its error, or write what it could
        not."""
        self.stopped = False
        error, self.error = self.error, None
        if error is not None:
            raise error
        out, self.unsent = self.unsent, b""
        if out:
            await self.sink.write(out)
            if self.ctx.ttft_s is None:
                _first_event_out(self.ctx, self.backend_id)


class _Lane:
    """The usual read of a relayed stream in one C call, from the backend's socket to the
    client's: offered each read while the relay task waits with ``_Push`` (the connection's
    data_received calls ``take`` first), it takes a read of whole plain events, in plain
    chunked framing, with nothing buffered before it, while the client's socket takes writes
    and the reads pushed since the relay task last ran are under the body's high-water mark:
    ``PlainChunks.relay`` takes the framing off, checks and counts the events into the
    stream's usage and frames them for the client, and they are queued for the client's
    transport, as ``_Push.feed`` and the sink's ``write_now`` would have (the same bytes, the
    same accounting). Anything else it declines before anything changed, and the read takes
    ``_Push``'s way. Each read went through 8 Python calls (~250 bytecodes); here 3 (~70).
    Measured: see the commit."""

    __slots__ = ("body", "plain", "scanner", "proto", "writes", "loop")

    def __init__(self, body: BodyStream, plain: PlainChunks, scanner: SSEScanner,
                 proto: FastProtocol) -> None:
        self.body = body
        self.plain = plain
        self.scanner = scanner
        self.proto = proto
        self.writes = proto.server.writes
        self.loop = proto.server.loop

    def take(self, data: bytes) -> bool:
        """Relay one read whole; False, with nothing done, when it must take the usual way."""
        body = self.body
        size = body._size + len(data)
        proto = self.proto
        t = proto.transport
        if size > STREAM_HIGH_WATER or proto.writing_paused or t is None or self.scanner._buf:
            return False
        out = self.plain.relay(data)
        if out is None:
            return False
        body._size = size  # as BodyStream.take: counted toward the high-water mark
        now = self.loop.time()
        if body._idle_s:
            body._last = now
        # At once, unless something waits in the turn's writes (then after it, in order, as
        # TurnWrites requires): a client is woken by its own stream's write alone, so a
        # write held to the turn's end only cost a callback and a list (bench/pace, a read
        # an event: router CPU per read 21.5 -> 20.1 µs, paired -0.9).
        writes = self.writes
        if writes._pending:
            writes.write(t, out)
        elif not t.is_closing():
            t.write(out)
        proto.last_active = now
        return True


def _open_lane(body: BodyStream, relayed: SSERelay, sink: Sink
               ) -> Callable[[bytes], bool] | None:
    """The stream's _Lane, when its body is in plain chunked framing and its client is the
    lean server's (None: every read takes _Push's way)."""
    plain = body.plain_chunks()
    client = getattr(sink, "client", None)
    if plain is None or client is None:
        return None
    proto, chunked = client()
    plain.open_relay(relayed.usage, relayed.scanner.max_event_bytes, chunked)
    return _Lane(body, plain, relayed.scanner, proto).take


def _settle(p: Pipeline, ctx: RequestContext, backend_id: str, index: int, usage: StreamUsage,
            interruption: str | None) -> None:
    if interruption == "client_disconnected":
        ctx.outcome = CLIENT_GONE
    elif interruption is not None:
        ctx.outcome = INTERRUPTED
        STREAMS_INTERRUPTED.labels(backend_id, interruption).inc()
    else:
        ctx.outcome = SUCCESS
    prompt, completion, estimated = usage.result()
    ctx.used = (prompt, completion)
    ctx.usage_estimated = estimated
    ctx.events = usage.events
    ctx.interruption = interruption
    route = ctx.route
    if route is not None and route.price is not None:
        ctx.cost_micro = route.price.cost_micro(prompt, completion)
    ctx.total_s = time.perf_counter() - ctx.started
    if p.stats is not None:  # the attempt's in-flight slot, held until the stream ended
        if interruption == "client_disconnected":  # no verdict on the backend
            p.stats.abandon(index)
        else:
            p.stats.end(index, ctx.outcome.backend_fault is False,
                        (ctx.ttft_s or ctx.total_s) * 1000)
    status = 200 if interruption != "client_disconnected" else 499
    p.accounts.account(ctx, status)
