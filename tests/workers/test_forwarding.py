"""Forwarding on callbacks (workers.forwarding.Forwarding, BackendPool.start) against real
sockets: the mock backend, and raw servers that close, stall or hang up."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator

import pytest

from apirouter.config import parse_config
from apirouter.routing import Decision
from apirouter.table import compile_table
from tests.workers.test_upstream import (
    HOST,
    ClosingBackend,
    chat_request,
    deadline,
    raw_server,
    read_request,
)
from tools.mock_backend import Behaviour, MockState, start_mock
from workers.forwarding import Forwarded, Forwarding, forward
from workers.table_view import TableCache, TableView
from workers.upstream import (
    BackendPool,
    UpstreamError,
    UpstreamResponse,
    UpstreamStale,
    UpstreamTimeout,
)

CHAT_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
async def mock() -> AsyncIterator[tuple[int, MockState]]:
    server, state = await start_mock(HOST, 0, name="fw")
    yield server.sockets[0].getsockname()[1], state
    server.close()


def view_of(backends: dict[str, object], models: dict[str, object]) -> TableView:
    """The worker's view of a table (pools included), as its TableCache builds it."""
    table = compile_table(parse_config({"backends": backends, "models": models}), source="t")
    return TableCache(None)._build(1, table)  # type: ignore[arg-type]


class Answers:
    """What the callbacks received, and a way to wait for it."""

    def __init__(self) -> None:
        self.got: list[tuple[object, object]] = []
        self.event = asyncio.Event()

    def __call__(self, result: object, exc: object) -> None:
        self.got.append((result, exc))
        self.event.set()

    async def one(self, timeout: float = 5.0) -> tuple[object, object]:
        await asyncio.wait_for(self.event.wait(), timeout)
        await asyncio.sleep(0.05)  # a second call, if there were one, would be in by now
        assert len(self.got) == 1, self.got
        return self.got[0]


async def test_start_answers_on_callbacks_and_pools_the_connection(
        mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    await pool.request(chat_request(port), deadline(5))  # one idle connection now
    tasks = len(asyncio.all_tasks())
    answers = Answers()
    assert pool.start(chat_request(port), deadline(5), answers) is not None
    assert len(asyncio.all_tasks()) == tasks  # no task for it
    resp, exc = await answers.one()
    assert exc is None and isinstance(resp, UpstreamResponse) and resp.status == 200
    assert len(pool._idle) == 1 and not pool._inflight and state.connections == 1
    pool.close()


async def test_start_without_an_idle_connection_leaves_it_to_exchange(
        mock: tuple[int, MockState]) -> None:
    port, _ = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    assert pool.start(chat_request(port), deadline(5), Answers()) is None
    assert not pool._inflight
    pool.close()


async def test_start_on_a_connection_the_backend_closed_says_stale() -> None:
    backend = ClosingBackend()
    server, port = await raw_server(backend.handler)  # type: ignore[arg-type]
    pool = BackendPool("http", HOST, port, 4, 1.0)
    await pool.request(chat_request(port), deadline(2))
    # The backend's close may not have arrived yet: the connection is still in the pool.
    answers = Answers()
    if pool.start(chat_request(port), deadline(2), answers) is not None:
        _, exc = await answers.one()
        assert isinstance(exc, UpstreamStale)
        assert backend.served == 1  # the backend never saw the second request
    pool.close()
    server.close()


async def test_cancel_closes_the_connection_and_nothing_is_answered(
        mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    await pool.request(chat_request(port), deadline(5))
    state.behaviour = Behaviour(latency_ms=200)
    answers = Answers()
    conn = pool.start(chat_request(port), deadline(5), answers)
    assert conn is not None
    await asyncio.sleep(0.02)
    pool.cancel(conn)
    await asyncio.sleep(0.3)
    assert answers.got == []  # the answer that came later was not taken
    assert pool.open_connections == 0 and not pool._inflight  # closed, not pooled
    pool.cancel(conn)  # twice: nothing more happens
    pool.close()


async def test_a_deadline_on_callbacks_is_a_timeout(mock: tuple[int, MockState]) -> None:
    port, state = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    await pool.request(chat_request(port), deadline(5))
    state.behaviour = Behaviour(latency_ms=500)
    answers = Answers()
    pool.start(chat_request(port), deadline(0.05), answers)
    resp, exc = await answers.one(2.0)
    assert resp is None and isinstance(exc, UpstreamTimeout)
    assert pool.open_connections == 0  # an answer that never came: the connection closed
    pool.close()


async def test_a_failing_callback_is_logged_and_the_connection_stays_usable(
        mock: tuple[int, MockState], caplog: pytest.LogCaptureFixture) -> None:
    port, _ = mock
    pool = BackendPool("http", HOST, port, 4, 1.0)
    await pool.request(chat_request(port), deadline(5))
    called = asyncio.Event()

    def broken(resp: UpstreamResponse | None, exc: UpstreamError | None) -> None:
        called.set()
        raise ValueError("a bug in the caller")

    pool.start(chat_request(port), deadline(5), broken)
    await asyncio.wait_for(called.wait(), 5)
    assert "the end of a backend exchange was not handled" in caplog.text
    resp = await pool.request(chat_request(port), deadline(5))  # the same connection, fine
    assert resp.status == 200 and pool.open_connections == 1
    pool.close()


async def forwarded(view: TableView, model: str = "m") -> Forwarded:
    loop = asyncio.get_running_loop()
    answers = Answers()
    f = Forwarding(view, view.table.routes[model], "/v1/chat/completions", CHAT_BODY, "r-1",
                   loop, None, answers)
    f.start()
    fwd, exc = await answers.one()
    assert exc is None and isinstance(fwd, Forwarded)
    return fwd


async def test_forwarding_retries_a_stale_connection_on_a_fresh_one() -> None:
    """The backend answers, then closes the connection 50 ms later without reading on: the
    next request, sent at once on the pooled connection, is never seen by it, and goes again
    on a fresh connection (one attempt, as far as failover and the records go)."""
    served = 0

    async def answer_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(r)
        served += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()

    server, port = await raw_server(answer_then_close)  # type: ignore[arg-type]
    view = view_of({"a": f"http://{HOST}:{port}"}, {"m": {"backends": ["a"]}})
    pool = view.targets["a"].pool
    loop = asyncio.get_running_loop()
    results: list[Forwarded] = []
    done = asyncio.Event()

    def then(fwd: Forwarded | None, exc: BaseException | None) -> None:
        assert exc is None and fwd is not None
        results.append(fwd)
        if len(results) < 4:  # the next one at once, on the connection just pooled
            reused = len(pool._idle) == 1
            Forwarding(view, view.table.routes["m"], "/v1/chat/completions", CHAT_BODY,
                       "r", loop, None, then).start()
            stale.append(reused)
        else:
            done.set()

    stale: list[bool] = []
    Forwarding(view, view.table.routes["m"], "/v1/chat/completions", CHAT_BODY, "r", loop,
               None, then).start()
    await asyncio.wait_for(done.wait(), 5)
    assert all(f.outcome.success and f.attempts == 1 and f.response is not None
               and f.response.body == b"ok" for f in results)
    assert stale and all(stale)  # each next request went out on the closing connection
    assert served == 4
    pool.close()
    server.close()


async def test_forwarding_fails_over_from_a_timeout_within_one_pool() -> None:
    """Two backends at one address share a pool: the second attempt starts inside the first
    one's expiry, and its own deadline must still be watched (it was not: the watch re-armed
    for the expired exchanges' soonest and dropped the new one's)."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(5)

    server, port = await raw_server(silent)  # type: ignore[arg-type]
    url = f"http://{HOST}:{port}"
    view = view_of({"a": {"url": url, "timeout_s": 0.1}, "b": {"url": url, "timeout_s": 0.1}},
                   {"m": {"backends": ["a", "b"]}})
    for target in view.targets.values():  # warm: an idle connection, so the first attempt
        target.pool._idle.append(await target.pool._connect(deadline(2)))  # runs on callbacks
    started = time.perf_counter()
    fwd = await forwarded(view)
    took = time.perf_counter() - started
    assert fwd.attempts == 2 and fwd.decision is Decision.FAILOVER
    assert fwd.error is not None and fwd.error.code == "BACKEND_TIMEOUT"
    assert took < 1.0  # both 0.1 s deadlines fired, not the request's 60 s
    server.close()
    for target in view.targets.values():
        target.pool.close()


async def test_forward_awaited_is_cancelled_with_its_caller(mock: tuple[int, MockState]) -> None:
    port, state = mock
    state.behaviour = Behaviour(latency_ms=300)
    view = view_of({"a": f"http://{HOST}:{port}"}, {"m": {"backends": ["a"]}})
    pool = view.targets["a"].pool
    await pool.request(chat_request(port), deadline(5))
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(forward(view, view.table.routes["m"], "/v1/chat/completions",
                                         CHAT_BODY, "r-2", loop, None))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert pool.open_connections == 0 and not pool._inflight  # closed, not pooled
    pool.close()


async def test_a_request_on_callbacks_leaves_no_reference_cycle(
        mock: tuple[int, MockState]) -> None:
    """The worker raises the collector's thresholds for the hot path: whatever a request
    leaves in a reference cycle stays allocated until a collection finds it."""
    port, _ = mock
    view = view_of({"a": f"http://{HOST}:{port}"}, {"m": {"backends": ["a"]}})
    await forwarded(view)  # a connection in the pool, imports and caches warm
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            fwd = await forwarded(view)
            assert fwd.outcome.success
        del fwd
        assert gc.collect() == 0
    finally:
        gc.enable()
    view.targets["a"].pool.close()


async def test_each_attempt_retries_its_own_stale_connection() -> None:
    """Backend a's pooled connection is stale (retried, then a 503: fail over), and so is b's:
    b's attempt must get its own retry on a fresh connection, as each exchange did before."""
    statuses = iter([b"200", b"200", b"503", b"200", b"200"])  # a, b warm; a retried: 503

    async def second_request_closes(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            try:
                await read_request(r)
            except Exception:
                return
            n += 1
            if n == 2:  # the pooled connection's next request: closed unanswered
                w.close()
                return
            w.write(b"HTTP/1.1 " + next(statuses) + b" X\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    sa, pa = await raw_server(second_request_closes)  # type: ignore[arg-type]
    sb, pb = await raw_server(second_request_closes)  # type: ignore[arg-type]
    view = view_of({"a": f"http://{HOST}:{pa}", "b": f"http://{HOST}:{pb}"},
                   {"m": {"backends": ["a", "b"]}})
    for backend, port in (("a", pa), ("b", pb)):
        pool = view.targets[backend].pool
        assert (await pool.request(chat_request(port), deadline(2))).status == 200
    loop = asyncio.get_running_loop()
    fwd = await forward(view, view.table.routes["m"], "/v1/chat/completions", CHAT_BODY, "r",
                        loop, None)
    assert fwd.attempts == 2 and fwd.outcome.success, (fwd.attempts, fwd.error)
    for target in view.targets.values():
        target.pool.close()
    sa.close()
    sb.close()


async def test_a_stream_held_as_its_caller_is_cancelled_is_closed(
        mock: tuple[int, MockState]) -> None:
    """forward()'s caller cancelled after the attempts ended but before it woke up to take
    the result: the held stream nobody will relay must be closed (its backend connection, its
    in-flight count), not dropped."""
    port, _ = mock
    view = view_of({"a": f"http://{HOST}:{port}"}, {"m": {"backends": ["a"]}})
    loop = asyncio.get_running_loop()
    closed: list[bool] = []

    class Body:
        def close(self) -> None:
            closed.append(True)

    class Held:
        body = Body()
        target = view.targets["a"]

    caller: asyncio.Future[Forwarded] | None = None

    async def attempt(target: object, data: bytes, until: float) -> tuple[UpstreamResponse, Held]:
        # Two turns from now: after the attempt's task has ended and forward()'s future has
        # its result, before the caller has run again.
        loop.call_soon(lambda: loop.call_soon(caller.cancel))  # type: ignore[union-attr]
        return UpstreamResponse(200, [], b""), Held()

    caller = asyncio.ensure_future(forward(view, view.table.routes["m"], "/v1/chat/completions",
                                           CHAT_BODY, "r", loop, None, attempt))  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert closed == [True]
    view.targets["a"].pool.close()
