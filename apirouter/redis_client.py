"""A small pipelined Redis client: one connection, RESP2, EVALSHA, deadlines. Workers use it on
the hot path (admission), the supervisor for bulk writes (audit store).

redis-py's asyncio client costs 40-65 µs of CPU a call (design brief); admission needs one
script call per request, so the worker keeps a single connection of its own, writes commands
back to back (pipelining: replies come in order) and resolves one future per reply — or, for a
caller that takes its reply in a callback (``submit_waiter``), hands it over in the read callback
that brought it, without a loop iteration and a task step in between. A call
that misses its deadline fails alone; a connection error fails every call on it, and the
connection is then
dropped and re-opened by the next call; a late reply to an abandoned call is read and thrown
away. Errors are RedisUnavailable (retriable), RedisError (Redis answered with an error).

Liveness (``stall_timeout``): a call made without a deadline of its own waits for its reply
however late it comes, as long as the connection is alive. The connection is declared dead —
every call on it failing with RedisUnavailable — when replies are owed and nothing at all has
arrived for ``stall_timeout`` seconds since the last byte read (or since the oldest owed reply
was asked for). Before declaring that, the watchdog looks at the socket itself: bytes waiting
there mean the event loop, not Redis, was late, and the connection lives on.
"""

from __future__ import annotations

import asyncio
import re
import select
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

RespValue = Any


class ReplyWaiter(Protocol):
    """What waits for a reply: an asyncio future, or an object that acts on the reply (or the
    connection's failure) inside ``set_result``/``set_exception``, called from the read
    callback that brought it. What those raise goes to the loop's exception handler, never
    taken for Redis's failure. ``done()``: the reply is no longer wanted (it is still read in
    order, and dropped): a reply is handed to ``set_result`` without asking, and a waiter
    done must ignore it (as PendingAdmission does) or raise asyncio.InvalidStateError (as a
    future does)."""

    def done(self) -> bool: ...

    def set_result(self, result: RespValue, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class RedisUnavailable(Exception):
    """No answer: connect failure, connection lost, or the deadline passed."""


class RedisError(Exception):
    """Redis answered with an error reply."""


# Arguments repeat from call to call (the script's sha, bucket key names, capacities, rates):
# their RESP bulk-string encodings are kept, a dict per type (1, 1.0 and True are equal keys).
# An admission's EVALSHA of ~16 arguments took ~7 µs to encode argument by argument, ~2 µs so.
_BULK_CACHE_MAX = 8192
_bulk_str: dict[str, bytes] = {}
_bulk_int: dict[int, bytes] = {}


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _bulk_of(a: bytes | str | int | float) -> bytes:
    t = type(a)
    if t is str:
        assert isinstance(a, str)
        enc = _bulk(a.encode())
        cache: dict[Any, bytes] = _bulk_str
    elif t is int:
        assert isinstance(a, int)
        enc = b"$%d\r\n%d\r\n" % (len(b"%d" % a), a)
        cache = _bulk_int
    elif isinstance(a, bytes):  # values (records, payloads): not worth keeping
        return _bulk(a)
    elif isinstance(a, str):  # a str subclass: its characters
        return _bulk(a.encode())
    elif isinstance(a, float):
        return _bulk(repr(a).encode())
    else:  # a bool or an int subclass: as str() writes it
        return _bulk(str(a).encode())
    if len(cache) >= _BULK_CACHE_MAX:
        cache.clear()
    cache[a] = enc
    return enc


# The bulk strings of 0-1023, by value (bulk_int's, for callers that look them up inline)
SMALL_BULK_INTS = _SMALL_INTS = tuple(b"$%d\r\n%d\r\n" % (len(b"%d" % i), i)
                                      for i in range(1024))


def bulk_int(i: int) -> bytes:
    """An int's RESP bulk string (those of 0-1023 kept; nothing else is: per-request counts
    would only crowd the kept encodings out)."""
    if 0 <= i < 1024:
        return _SMALL_INTS[i]
    return b"$%d\r\n%d\r\n" % (len(b"%d" % i), i)


def bulk_str(s: str) -> bytes:
    """A str's RESP bulk string, not kept (for values that do not repeat: ids, nonces)."""
    return _bulk(s.encode())


def encode_command(*args: bytes | str | int | float) -> bytes:
    """A command as a RESP array of bulk strings (floats by repr, other values by str)."""
    out = [b"*%d\r\n" % len(args)]
    strs, ints = _bulk_str, _bulk_int
    for a in args:
        t = type(a)
        enc = (strs.get(a) if t is str else  # type: ignore[arg-type]
               ints.get(a) if t is int else None)  # type: ignore[arg-type]
        out.append(enc if enc is not None else _bulk_of(a))
    return b"".join(out)


class _NeedMore(Exception):
    pass


_COLON, _PLUS, _MINUS, _DOLLAR, _STAR = b":+-$*"


# An array of five integers: the reply of every admission (the admission script's). One regex
# match reads it whole: ~1.5 -> ~1.0 µs a reply.
_FIVE_INTS = re.compile(rb"\*5\r\n" + rb":(-?\d+)\r\n" * 5).match


# A run of the replies a pipeline of SET ... NX gets (+OK: set; a nil: the key was there),
# each five bytes: read a run at a time for a _Tally.
_STATUS_RUN = re.compile(rb"(?:\+OK\r\n|\$-1\r\n)+").match


class _Tally:
    """The replies of a pipeline whose caller wants only the first error among them
    (``RedisClient.pipeline_checked``): in the connection's waiters once for each of its
    replies (they still count replies), and its +OK and nil replies taken a run at a time
    (data_received: one regex match, and a pop each, not a parse and a future each: with
    audit_writer's one-step encoding, the audit store's two SETs a record cost the supervisor
    ~5.7-8.6 -> ~3.1-3.3 µs of CPU a record, batches of 390, /work/team/perf/auditput.py).
    ``fut`` gets the first error reply, or None, once every reply is in."""

    __slots__ = ("left", "error", "fut")

    def __init__(self, fut: asyncio.Future[RespValue], count: int) -> None:
        self.left = count
        self.error: RedisError | None = None
        self.fut = fut

    def done(self) -> bool:
        return False  # (every reply is counted, even after the caller gave up)

    def set_result(self, value: RespValue) -> None:
        if self.error is None and isinstance(value, RedisError):
            self.error = value
        self.took(1)

    def took(self, n: int) -> None:
        """``n`` more replies in (none of them an error)."""
        self.left = left = self.left - n
        if not left and not self.fut.done():
            self.fut.set_result(self.error)

    def set_exception(self, exception: BaseException) -> None:
        if not self.fut.done():
            self.fut.set_exception(exception)


def parse_reply(buf: bytes, pos: int) -> tuple[RespValue, int]:
    """One RESP2 value from ``buf`` at ``pos``: (value, next position); _NeedMore if partial."""
    m = _FIVE_INTS(buf, pos)
    if m is not None:
        return [*map(int, m.groups())], m.end()
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _NeedMore
    kind = buf[pos]
    nxt = end + 2
    if kind == _COLON:
        return int(buf[pos + 1:end]), nxt
    if kind == _STAR:
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            if nxt < len(buf) and buf[nxt] == _COLON:  # integers inline (script replies)
                end = buf.find(b"\r\n", nxt)
                if end < 0:
                    raise _NeedMore
                items.append(int(buf[nxt + 1:end]))
                nxt = end + 2
            else:
                item, nxt = parse_reply(buf, nxt)
                items.append(item)
        return items, nxt
    if kind == _DOLLAR:
        n = int(buf[pos + 1:end])
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            raise _NeedMore
        return buf[nxt:nxt + n], nxt + n + 2
    if kind == _PLUS:
        return buf[pos + 1:end].decode(), nxt
    if kind == _MINUS:
        return RedisError(buf[pos + 1:end].decode()), nxt
    raise RedisUnavailable(f"unexpected RESP type {buf[pos:pos + 1]!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.loop = client._loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiters: deque[ReplyWaiter] = deque()
        self.progress = 0.0  # loop time of the last byte read, or of the first owed reply
        self.watchdog: asyncio.TimerHandle | None = None
        self.fd = -1
        self.out: list[bytes] = []  # commands of this loop turn, written together at its end
        self.out_replies = 0  # the replies those commands will owe
        # those of them encoded when written (RedisClient.submit_later): place, encoder
        self.later: list[tuple[int, Callable[[], bytes]]] = []
        self.idle = True  # no reply was outstanding when the last command was owed

    def send(self, data: bytes, replies: int = 1) -> None:
        """Write a command. On an idle connection it goes out at once (a lone request must not
        wait); while replies are outstanding, everything queued in one event-loop turn goes out
        in one write at the end of the turn (one system call for the admissions and
        settlements of many requests instead of one each; the wait is the rest of the turn's
        callbacks, shorter than the replies already awaited). When the client's ``lone()``
        says other requests are being served (others could join this write), an idle
        connection's command waits for the end of the turn too: one write a turn, not two."""
        if self.idle and not self.out and self.transport is not None and (
                self.client.lone is None or self.client.lone()):
            self.transport.write(data)
            return
        if not self.out:
            self.loop.call_soon(self._flush)
        self.out.append(data)
        self.out_replies += replies

    def request(self, data: bytes) -> asyncio.Future[RespValue]:
        """Send one command; the future of its reply."""
        fut: asyncio.Future[RespValue] = self.loop.create_future()
        self.owe([fut])
        self.send(data)
        return fut

    def _flush(self) -> None:
        out, self.out = self.out, []
        self.out_replies = 0
        if self.later:
            later, self.later = self.later, []
            try:
                for i, encode in later:
                    out[i] = encode()
            except Exception as e:  # a bug of ours: replies and waiters would not match
                self.fail(RedisUnavailable(f"a command could not be encoded: {e!r}"))
                return
        if self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def owe(self, futs: Sequence[ReplyWaiter]) -> None:
        """Replies now owed on this connection; the liveness clock runs while any are."""
        self.idle = not self.waiters
        if self.idle:
            self.progress = self.loop.time()
        self.waiters.extend(futs)
        stall = self.client.stall_timeout
        if stall is not None and self.watchdog is None:
            self.watchdog = self.loop.call_at(self.progress + stall, self._check)

    def _check(self) -> None:
        self.watchdog = None
        stall = self.client.stall_timeout
        if self.transport is None or not self.waiters or stall is None:
            return
        now = self.loop.time()
        if self.out:
            # Replies owed only for commands our own loop had not sent yet (it was blocked):
            # Redis is not late, the clock starts now. Anything owed for bytes already sent
            # keeps the clock running, however much traffic keeps queuing behind it.
            quiet = self.out_replies == len(self.waiters)
            self._flush()
            if quiet:
                self.progress = now
        if now < self.progress + stall:
            self.watchdog = self.loop.call_at(self.progress + stall, self._check)
            return
        if self._readable():  # the reply is here; our loop was the late one
            self.progress = now
            self.watchdog = self.loop.call_at(now + stall, self._check)
            return
        self.fail(RedisUnavailable(f"no reply from Redis for {stall * 1000:.0f} ms"))

    def _readable(self) -> bool:
        if self.fd < 0:
            return False
        try:
            return bool(select.select([self.fd], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def data_received(self, data: bytes) -> None:
        self.progress = self.loop.time()
        buf = self.buf = self.buf + data if self.buf else data
        end = len(buf)
        pos = 0
        try:
            # (self.waiters read each time: a waiter may fail the connection, emptying it)
            while self.waiters and pos < end:
                # An admission's reply read here (parse_reply's first step, without its call)
                m = _FIVE_INTS(buf, pos)
                if m is not None:
                    value: RespValue = [*map(int, m.groups())]
                    pos = m.end()
                else:
                    w = self.waiters[0]
                    if type(w) is _Tally:  # a run of its +OK and nil replies at once
                        r = _STATUS_RUN(buf, pos, min(end, pos + 5 * w.left))
                        if r is not None:
                            n = (r.end() - pos) // 5
                            pos = r.end()
                            popleft = self.waiters.popleft
                            for _ in range(n):
                                popleft()
                            w.took(n)
                            continue
                    try:
                        value, pos = parse_reply(buf, pos)
                    except _NeedMore:
                        break
                    except (ValueError, RedisUnavailable) as e:
                        self.fail(RedisUnavailable(f"bad reply: {e}"))
                        return
                # (no done() asked first: a waiter done ignores it, a future done raises)
                try:
                    self.waiters.popleft().set_result(value)
                except asyncio.InvalidStateError:  # a future given up on: the reply dropped
                    pass
                except Exception as e:  # a waiter's own failure is not Redis's
                    self._waiter_failed(e)
        finally:
            self.buf = buf[pos:] if pos < end else b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisUnavailable("connection lost"))

    def fail(self, exc: Exception) -> None:
        """Fail every reply owed. The connection is given up first: the waiters told (which
        may act at once: ReplyWaiter) find it gone, not half torn down."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        waiters, self.waiters = self.waiters, deque()
        self.out = []
        self.out_replies = 0
        self.later = []
        transport, self.transport = self.transport, None
        if self.client._proto is self:
            self.client._proto = None
        if transport is not None:
            transport.abort()
        for w in waiters:
            if not w.done():
                try:
                    w.set_exception(exc)
                except Exception as e:
                    self._waiter_failed(e)

    def _waiter_failed(self, e: Exception) -> None:
        self.loop.call_exception_handler({"message": "a Redis reply's waiter failed",
                                          "exception": e, "protocol": self})


class RedisClient:
    def __init__(self, url: str, stall_timeout: float | None = None,
                 lone: Callable[[], bool] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"unsupported Redis URL {url!r} (redis://host:port/db)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        self.password = parts.password
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._loop = asyncio.get_running_loop()
        self.stall_timeout = stall_timeout  # seconds; None: only per-call deadlines
        # Whether the caller is alone (no other request could join a command's write this
        # turn); None: always (an idle connection's command goes out at once)
        self.lone = lone

    async def _connection(self, deadline: float) -> _Protocol:
        if self._proto is not None:
            return self._proto
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(self._connecting)
        except TimeoutError:
            raise RedisUnavailable("connect timed out") from None
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        try:
            _, proto = await self._loop.create_connection(lambda: _Protocol(self), self.host,
                                                          self.port)
        except OSError as e:
            raise RedisUnavailable(f"cannot connect: {e.strerror or e}") from None
        setup = []
        if self.password:
            setup.append(encode_command("AUTH", self.password))
        if self.db:
            setup.append(encode_command("SELECT", self.db))
        self._proto = proto
        for cmd in setup:
            reply = await self._send(proto, cmd, self._loop.time() + 2)
            if isinstance(reply, RedisError):
                proto.fail(RedisUnavailable(str(reply)))
                raise RedisUnavailable(f"setup failed: {reply}")
        return proto

    async def _send(self, proto: _Protocol, data: bytes, deadline: float | None) -> RespValue:
        if proto.transport is None:
            raise RedisUnavailable("not connected")
        fut = proto.request(data)
        if deadline is None:
            return await fut
        timer = self._loop.call_at(deadline, _expire, fut, proto)
        try:
            return await fut
        finally:
            timer.cancel()

    def _connect_deadline(self, timeout: float | None) -> float:
        bound = timeout if timeout is not None else self.stall_timeout
        if bound is None:
            raise ValueError("a call needs a timeout when the client has no stall_timeout")
        return self._loop.time() + bound

    async def execute(self, *args: bytes | str | int | float,
                      timeout: float | None) -> RespValue:
        """Run one command; RedisError replies are returned, not raised (scripts need them).
        ``timeout=None``: wait for the reply while the connection lives (``stall_timeout``)."""
        return await self.execute_encoded(encode_command(*args), timeout)

    async def execute_encoded(self, data: bytes, timeout: float | None) -> RespValue:
        """``execute`` for one command the caller encoded itself (encode_command's bytes)."""
        proto = self._proto
        if proto is None:
            proto = await self._connection(self._connect_deadline(timeout))
        return await self._send(proto, data,
                                None if timeout is None else self._loop.time() + timeout)

    def submit(self, *args: bytes | str | int | float) -> asyncio.Future[RespValue] | None:
        """Queue one command on the live connection; the future of its reply, bounded by the
        connection's liveness (``stall_timeout``) only. None when not connected (use
        ``execute``, which connects)."""
        return self.submit_encoded(encode_command(*args))

    def submit_encoded(self, data: bytes) -> asyncio.Future[RespValue] | None:
        """``submit`` for one command the caller encoded itself."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return None
        return proto.request(data)

    def submit_waiter(self, data: bytes, waiter: ReplyWaiter) -> bool:
        """``submit_encoded`` whose reply goes to ``waiter`` (its ``set_result``, or
        ``set_exception`` when the connection fails) in the read callback that brings it.
        False when not connected (nothing was sent)."""
        proto = self._proto
        if proto is None or proto.transport is None:
            return False
        # proto.owe([waiter]) and proto.send(data), inline: one admission a request comes
        # this way (two calls and a list fewer)
        waiters = proto.waiters
        out = proto.out
        if waiters and proto.watchdog is not None:
            # Replies owed and the clock running (at c=32, nearly every admission): the
            # command joins the turn's write (the rest below, with what it knows skipped)
            proto.idle = False
            waiters.append(waiter)
            if not out:
                self._loop.call_soon(proto._flush)
            out.append(data)
            proto.out_replies += 1
            return True
        idle = proto.idle = not waiters
        if idle:
            proto.progress = self._loop.time()
        waiters.append(waiter)
        if proto.watchdog is None and self.stall_timeout is not None:
            proto.watchdog = self._loop.call_at(proto.progress + self.stall_timeout,
                                                proto._check)
        if idle and not out and (self.lone is None or self.lone()):
            proto.transport.write(data)
        else:
            if not out:
                self._loop.call_soon(proto._flush)
            out.append(data)
            proto.out_replies += 1
        return True

    def queues(self) -> bool:
        """Whether a command submitted now would wait for the turn's write (replies are
        owed, commands are queued, or the caller is not alone), not go out at once."""
        proto = self._proto
        return proto is not None and (bool(proto.waiters) or bool(proto.out) or (
            self.lone is not None and not self.lone()))

    def submit_later(self, encode: Callable[[], bytes], waiter: ReplyWaiter) -> bool:
        """``submit_waiter`` for a command encoded when it is written (``encode()``): at once
        when it would go out at once (an idle connection, a lone request), else when the
        turn's commands are written together (at the end of the turn), in its place among them
        — so that what its caller adds to it in the meantime goes with it (a turn's admissions
        of one org in one script call). False when not connected (nothing was sent)."""
        if not self.queues():
            return self.submit_waiter(encode(), waiter)
        # It waits for the turn's write (queues()): submit_waiter queues an empty command
        # in its place, which the write fills in.
        if not self.submit_waiter(b"", waiter):
            return False
        proto = self._proto
        assert proto is not None
        proto.later.append((len(proto.out) - 1, encode))
        return True

    async def pipeline_checked(self, data: bytes, count: int, timeout: float
                               ) -> RedisError | None:
        """Send ``count`` commands the caller encoded itself (``data``) in one write; the first
        error reply among their replies (None: there was none), e.g. SET ... NX's of a bulk
        writer, counted a run at a time (_Tally), no future a reply."""
        deadline = self._loop.time() + timeout
        proto = await self._connection(deadline)
        if proto.transport is None:
            raise RedisUnavailable("not connected")
        fut: asyncio.Future[RespValue] = self._loop.create_future()
        tally = _Tally(fut, count)
        proto.owe([tally] * count)
        proto.send(data, count)
        timer = self._loop.call_at(deadline, _expire, fut, proto)
        try:
            error: RedisError | None = await fut
        finally:
            timer.cancel()
        return error

    def close(self) -> None:
        if self._proto is not None:
            self._proto.fail(RedisUnavailable("closed"))


MAX_OUTSTANDING = 10_000


def _expire(fut: asyncio.Future[RespValue], proto: _Protocol) -> None:
    if fut.done():
        return
    # The caller gives up; the future stays queued so its late reply is read and discarded in
    # order (replies are positional). A Redis that answers nothing at all is cut off.
    fut.set_exception(RedisUnavailable("deadline passed"))
    if len(proto.waiters) > MAX_OUTSTANDING:
        proto.fail(RedisUnavailable(f"over {MAX_OUTSTANDING} replies outstanding"))
