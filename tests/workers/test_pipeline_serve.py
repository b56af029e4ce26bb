"""Pipeline.serve, the lean server's entry, in-process against the mock backend: the common
request runs on callbacks to its reply, a hang-up is accounted, and nothing of a request is
left in a reference cycle (the worker raises the collector's thresholds for the hot path)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import warnings
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from apirouter.config import parse_config
from apirouter.keys import hash_key
from apirouter.outcomes import CLIENT_GONE
from apirouter.redis_client import encode_command
from apirouter.shm import TableReader, TableWriter
from apirouter.table import compile_table, encode_table
from tests.harness import RedisServer
from tools.mock_backend import Behaviour, MockState, start_mock
from workers.admission import AdmitBatch, PendingAdmission, finish_pending
from workers.context import Reply, RequestContext
from workers.pipeline import InFlight, Pipeline
from workers.table_view import TableCache
from workers.turn_writes import turn_writes

HOST = "127.0.0.1"
KEY = "ar-serve-test"
BUDGETED = "ar-serve-budgeted"
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                     "max_tokens": 8})


@pytest.fixture
async def mock() -> AsyncIterator[tuple[int, MockState]]:
    server, state = await start_mock(HOST, 0, name="serve")
    yield server.sockets[0].getsockname()[1], state
    server.close()


@pytest.fixture
def table_segment() -> Iterator[TableWriter]:
    writer = TableWriter(f"apirouter-test-serve-{os.getpid()}", 1 << 16)
    yield writer
    writer.close()


@pytest.fixture
async def pipeline(mock: tuple[int, MockState], table_segment: TableWriter
                   ) -> AsyncIterator[Pipeline]:
    port, _ = mock
    cfg = parse_config({
        "backends": {"a": f"http://{HOST}:{port}"},
        "models": {"m": {"backends": ["a"],
                         "price": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0}}},
        "tiers": {"t": {"rpm": 100000, "tpm": 10000000}},
        "keys": {"k": {"sha256": hash_key(KEY), "org": "acme", "tier": "t"},
                 "kb": {"sha256": hash_key(BUDGETED), "org": "acme", "tier": "t"}},
        "budgets": {"key:kb": {"period": "month", "spend": 1000}}})
    table_segment.publish(encode_table(compile_table(cfg, source="t")))
    p = Pipeline(TableCache(TableReader(table_segment.name)))
    yield p
    p.tables.close()


class Answers:
    def __init__(self) -> None:
        self.got: list[Reply | None] = []
        self.errors: list[BaseException] = []
        self.event = asyncio.Event()

    def __call__(self, reply: Reply | None, failed: BaseException | None) -> None:
        self.got.append(reply)
        if failed is not None:
            self.errors.append(failed)
        self.event.set()


def chat(p: Pipeline, n: int = 0, key: str = KEY) -> RequestContext:
    return p.context(p.by_path["/v1/chat/completions"], p.tables.current(), f"req-{n}", BODY,
                     hash_key(key), None)


async def served(p: Pipeline, n: int = 0) -> Reply:
    answers = Answers()
    p.serve(chat(p, n), answers)
    await asyncio.wait_for(answers.event.wait(), 5)
    (reply,) = answers.got
    assert reply is not None
    return reply


async def answered(p: Pipeline, ctx: RequestContext, waiting: str) -> tuple[InFlight, Reply]:
    """Serve ``ctx``, which must go on past ``serve`` (an InFlight whose ``waiting`` - task,
    admitting - is set); its one reply."""
    answers = Answers()
    handle = p.serve(ctx, answers)
    assert isinstance(handle, InFlight) and getattr(handle, waiting) is not None
    await asyncio.wait_for(answers.event.wait(), 5)
    (reply,) = answers.got
    assert reply is not None
    return handle, reply


async def test_the_common_request_runs_on_callbacks_to_its_reply(pipeline: Pipeline) -> None:
    await served(pipeline)  # the first opens the backend connection (in a task)
    tasks = len(asyncio.all_tasks())
    answers = Answers()
    handle = pipeline.serve(chat(pipeline), answers)
    assert isinstance(handle, InFlight)
    assert len(asyncio.all_tasks()) == tasks
    await asyncio.wait_for(answers.event.wait(), 5)
    (reply,) = answers.got
    assert reply is not None and reply.status == 200
    headers = dict(reply.headers)
    assert headers["X-Request-ID"] == "req-0" and headers["X-Router-Backend"] == "a"
    assert headers["X-Router-Decision"] == "PRIMARY"
    assert "X-RateLimit-Remaining" in headers
    assert orjson.loads(reply.body)["object"] == "chat.completion"


async def test_a_refusal_is_answered_at_once(pipeline: Pipeline) -> None:
    ctx = pipeline.context(pipeline.by_path["/v1/chat/completions"], pipeline.tables.current(),
                           "req-x", BODY, hash_key("ar-wrong"), None)
    reply = pipeline.serve(ctx, Answers())
    assert isinstance(reply, Reply) and reply.status == 401


async def test_a_hang_up_is_accounted_and_nothing_is_answered(
        pipeline: Pipeline, mock: tuple[int, MockState]) -> None:
    _, state = mock
    await served(pipeline)  # a pooled connection: the next request runs on callbacks
    state.behaviour = Behaviour(latency_ms=300)
    answers = Answers()
    ctx = chat(pipeline, 1)
    handle = pipeline.serve(ctx, answers)
    assert isinstance(handle, InFlight)
    await asyncio.sleep(0.05)
    handle.cancel()
    assert ctx.outcome is CLIENT_GONE and ctx.accounted
    handle.cancel()  # twice: accounted once
    await asyncio.sleep(0.4)
    assert answers.got == []
    pool = pipeline.tables.current().targets["a"].pool
    assert pool.open_connections == 0 and not pool._inflight  # closed, not pooled


async def test_a_failure_of_ours_after_the_backend_answered_is_a_500(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    await served(pipeline)

    def broken(ctx: RequestContext, fwd: object) -> Reply:
        raise ValueError("a bug in shaping")

    monkeypatch.setattr(pipeline, "finish", broken)
    reply = await served(pipeline, 2)
    assert reply.status == 500 and dict(reply.headers)["X-Request-ID"] == "req-2"


async def test_a_turns_settlements_are_applied_by_its_accounting_flush(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accounting flush at the end of a turn settles the turn's requests itself: nothing is
    left for a later iteration of the loop, which would first poll for I/O (at c=1, one
    system call and one loop turn a request)."""
    await served(pipeline)
    applied: list[int] = []
    table = pipeline.admission.table
    settle_records = table.settle_records  # (of token buckets alone: this request's)
    monkeypatch.setattr(table, "settle_records",
                        lambda items, now_ms: (applied.append(len(items)),
                                               settle_records(items, now_ms))[1])
    scheduled: list[object] = []  # what is left for a later iteration (still run)
    call_soon = pipeline.loop.call_soon
    monkeypatch.setattr(pipeline.loop, "call_soon",
                        lambda cb, *a, **k: (scheduled.append(cb), call_soon(cb, *a, **k))[1])
    seen: list[tuple[list[int], list[object]]] = []
    done = asyncio.Event()

    def answered(reply: Reply | None, failed: BaseException | None) -> None:
        # Answered: the request is accounted, its flush queued; run that flush now.
        applied.clear()
        scheduled.clear()
        pipeline.accounts.flush()
        seen.append((list(applied), list(scheduled)))
        done.set()

    pipeline.serve(chat(pipeline, 1), answered)
    await asyncio.wait_for(done.wait(), 5)
    assert seen == [([1], [])]


async def cycles_left_by(pipeline: Pipeline, requests: int, status: int) -> int:
    """Objects in reference cycles after ``requests`` requests answered ``status`` (a warm-up
    request first: a pooled connection, caches filled)."""
    assert (await served(pipeline)).status == status
    pipeline.accounts.flush()
    gc.collect()
    gc.disable()
    try:
        for n in range(requests):
            assert (await served(pipeline, n)).status == status
        await asyncio.sleep(0)  # the turn's accounting flush
        pipeline.accounts.flush()
        return gc.collect()
    finally:
        gc.enable()


async def test_requests_on_callbacks_leave_no_reference_cycle(pipeline: Pipeline) -> None:
    assert await cycles_left_by(pipeline, 20, 200) == 0


async def test_an_admission_that_must_wait_is_awaited_then_forwarded_on_callbacks(
        pipeline: Pipeline) -> None:
    """A budget makes the admission a coroutine (admit_now cannot take it): it runs in a task,
    and the forwarding after it on callbacks, as for any request."""
    await served(pipeline)
    ctx = chat(pipeline, 3, BUDGETED)
    handle, reply = await answered(pipeline, ctx, "task")
    assert reply.status == 200
    assert handle.task is None and handle.forwarding is None
    assert ctx.ticket is not None and ctx.ticket.budgets  # the budget was reserved


async def test_if_even_the_failure_reply_fails_the_server_is_told(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the error path itself (failure() raising) on callbacks: the request must still
    get its one answer; the server is handed the error (its own 500, or a close)."""
    await served(pipeline)

    def broken(*args: object) -> Reply:
        raise ValueError("a bug")

    monkeypatch.setattr(pipeline, "finish", broken)
    monkeypatch.setattr(pipeline, "failure", broken)
    answers = Answers()
    pipeline.serve(chat(pipeline, 6), answers)
    await asyncio.wait_for(answers.event.wait(), 5)
    assert answers.got == [None] and isinstance(answers.errors[0], ValueError)


async def test_a_failed_request_leaves_no_reference_cycle(
        pipeline: Pipeline, mock: tuple[int, MockState]) -> None:
    """A backend 500 ends in a catalog error raised through the callbacks that ran the
    request: its traceback must not keep their frames (and the read buffers in them) alive."""
    _, state = mock
    await served(pipeline)  # the backend connection, before the backend starts failing
    state.behaviour = Behaviour(error_rate=1.0, error_status=500)
    assert await cycles_left_by(pipeline, 10, 502) == 0


STREAM = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 8, "stream": True})


async def test_a_stream_cancelled_before_its_task_ran_holds_nothing(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream runs in a task; a client gone before that task's first step (its
    connection_lost already queued) must leave no reservation behind and no coroutine
    never awaited."""
    await served(pipeline)
    reserved: list[object] = []
    admit_now = pipeline.admission.admit_now
    monkeypatch.setattr(pipeline.admission, "admit_now",
                        lambda *a: reserved.append(a) or admit_now(*a))
    ctx = pipeline.context(pipeline.by_path["/v1/chat/completions"], pipeline.tables.current(),
                           "req-s", STREAM, hash_key(KEY), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = pipeline.serve(ctx, Answers())
        assert isinstance(handle, asyncio.Task)
        handle.cancel()
        await asyncio.sleep(0.05)
        gc.collect()
    assert reserved == [] and ctx.ticket is None
    assert not [w for w in caught if "never awaited" in str(w.message)]


# -- Redis admission on callbacks (Admission.admit_soon) -----------------------------------------

BIG = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2000})  # the tier's tokens a minute fit one at a time


def redis_table(mock_port: int, redis_url: str, org: str, **server: object) -> bytes:
    return encode_table(compile_table(parse_config({
        "server": {"redis_url": redis_url, **server},
        "backends": {"a": f"http://{HOST}:{mock_port}"},
        "models": {"m": {"backends": ["a"]}},
        # 120 requests of burst, one more each 600 ms: a test's remaining counts are exact
        "tiers": {"small": {"rpm": 100, "rpm_burst": 120, "tpm": 2500, "tpm_burst": 2500},
                  "one": {"rpm": 1, "rpm_burst": 1}},
        "keys": {"k": {"sha256": hash_key(KEY), "org": org, "tier": "small"},
                 "k1": {"sha256": hash_key(ONE), "org": org, "tier": "one"}}}), source="t"))


ONE = "ar-serve-one-a-minute"


@pytest.fixture
async def redis_pipeline(mock: tuple[int, MockState], table_segment: TableWriter,
                         redis_server: RedisServer) -> AsyncIterator[Pipeline]:
    port, _ = mock
    # fresh buckets on the session's Redis
    table_segment.publish(redis_table(port, redis_server.url, f"acme-{os.urandom(4).hex()}"))
    p = Pipeline(TableCache(TableReader(table_segment.name)))
    yield p
    if p.admission.redis is not None:
        p.admission.redis.close()
    p.tables.close()


def redis_command(server: RedisServer, *args: str) -> bytes:
    with socket.create_connection((HOST, server.port), timeout=5) as s:
        s.sendall(encode_command(*args))
        return s.recv(256)


async def test_a_redis_admission_runs_on_callbacks_to_its_reply(
        redis_pipeline: Pipeline) -> None:
    """Connected and the script loaded, Redis's decision is taken in the read callback of its
    reply and the request forwarded from there: no task, where one woke a loop iteration
    after the command was sent and again after the reply came."""
    p = redis_pipeline
    await served(p)  # connects to Redis, loads the script, opens the backend connection
    tasks = len(asyncio.all_tasks())
    answers = Answers()
    handle = p.serve(chat(p, 1), answers)
    assert isinstance(handle, InFlight) and handle.task is None
    assert handle.admitting is not None
    assert len(asyncio.all_tasks()) == tasks
    await asyncio.wait_for(answers.event.wait(), 5)
    (reply,) = answers.got
    assert reply is not None and reply.status == 200
    assert handle.admitting is None and handle.forwarding is None
    assert int(dict(reply.headers)["X-RateLimit-Remaining"]) == 118  # the second of 120


async def test_a_redis_without_the_script_loads_it_again_and_charges_once(
        redis_pipeline: Pipeline, redis_server: RedisServer) -> None:
    """Redis restarted or flushed its scripts: NOSCRIPT takes admit's path, which loads the
    script again; the request is admitted by Redis (not the failure policy), charged once."""
    p = redis_pipeline
    await served(p)
    assert redis_command(redis_server, "SCRIPT", "FLUSH").startswith(b"+OK")
    _, reply = await answered(p, chat(p, 1), "admitting")  # sent on callbacks
    assert reply.status == 200
    headers = dict(reply.headers)
    assert int(headers["X-RateLimit-Remaining"]) == 118
    assert p.admission.failures == 0
    assert p.admission._sha.get("admit") is not None
    _, again = await answered(p, chat(p, 2), "admitting")  # and on callbacks again
    assert again.status == 200


async def test_a_hang_up_while_redis_decides_releases_its_charge(
        redis_pipeline: Pipeline, redis_server: RedisServer, mock: tuple[int, MockState]
        ) -> None:
    """Redis holds the admission (paused, within its liveness bound) and the client hangs up:
    the request is accounted as gone, never forwarded, nothing is answered, and what the
    script charged when Redis ran it is released."""
    p = redis_pipeline
    first = p.context(p.by_path["/v1/chat/completions"], p.tables.current(), "req-big", BIG,
                      hash_key(KEY), None)
    answers = Answers()
    p.serve(first, answers)
    await asyncio.wait_for(answers.event.wait(), 5)
    assert answers.got[0] is not None and answers.got[0].status == 200
    p.accounts.flush()  # its settlement: the mock used far fewer tokens than reserved
    await asyncio.sleep(0.1)
    assert redis_command(redis_server, "CLIENT", "PAUSE", "300", "ALL").startswith(b"+OK")
    ctx = p.context(p.by_path["/v1/chat/completions"], p.tables.current(), "req-gone", BIG,
                    hash_key(KEY), None)
    gone = Answers()
    handle = p.serve(ctx, gone)
    assert isinstance(handle, InFlight) and handle.admitting is not None
    await asyncio.sleep(0.05)
    handle.cancel()
    assert ctx.outcome is CLIENT_GONE and ctx.accounted
    # Redis, unpaused, runs the script (charging 2,000+ tokens), then the release.
    assert p.admission._releases
    await releases_sent(p, 250)
    assert gone.got == []
    assert mock[1].requests == 1  # never forwarded
    after = p.context(p.by_path["/v1/chat/completions"], p.tables.current(), "req-again", BIG,
                      hash_key(KEY), None)
    again = Answers()
    p.serve(after, again)
    await asyncio.wait_for(again.event.wait(), 5)
    assert again.got[0] is not None and again.got[0].status == 200  # refused if still charged


async def test_redis_admissions_on_callbacks_leave_no_reference_cycle(
        redis_pipeline: Pipeline) -> None:
    assert await cycles_left_by(redis_pipeline, 20, 200) == 0


async def test_a_refusal_by_redis_on_callbacks_is_answered_and_accounted(
        redis_pipeline: Pipeline) -> None:
    p = redis_pipeline
    await served(p)
    _, first = await answered(p, chat(p, 1, ONE), "admitting")
    assert first.status == 200
    ctx = chat(p, 2, ONE)
    handle, reply = await answered(p, ctx, "admitting")
    assert reply.status == 429
    headers = dict(reply.headers)
    assert headers["X-RateLimit-Remaining"] == "0" and int(headers["Retry-After"]) >= 1
    assert orjson.loads(reply.body)["error"]["code"] == "rate_limit_exceeded"
    assert ctx.ticket is None and handle.forwarding is None and handle.admitting is None


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_redis_connection_lost_while_deciding_takes_the_failure_policy(
        redis_pipeline: Pipeline, table_segment: TableWriter, mock: tuple[int, MockState],
        redis_server: RedisServer, policy: str) -> None:
    """The connection drops with the admission on it: the policy decides at once (open:
    forwarded, without rate-limit headers; closed: 503), once; the breaker opens, readiness
    says degraded, and the reservation waits for its release on Redis."""
    p = redis_pipeline
    await served(p)
    table_segment.publish(redis_table(mock[0], redis_server.url, f"acme-{os.urandom(4).hex()}",
                                      redis_failure_policy=policy))
    await served(p, 1)  # the same client (same URL), the new table
    answers = Answers()
    handle = p.serve(chat(p, 2), answers)
    assert isinstance(handle, InFlight) and handle.admitting is not None
    pending = handle.admitting
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None and redis._proto.transport is not None
    redis._proto.transport.abort()  # the connection drops: connection_lost
    await asyncio.wait_for(answers.event.wait(), 5)
    (reply,) = answers.got
    assert reply is not None
    if policy == "open":
        assert reply.status == 200
        assert not any(h.startswith("X-RateLimit") for h, _ in reply.headers)
    else:
        assert reply.status == 503
    assert p.admission.failures == 1 and "connection lost" in (p.admission.last_error or "")
    assert p.admission.status(p.tables.current().table.limits)["breaker"] == "open"
    assert pending.rid in p.admission._releases  # released once the breaker lets it
    await asyncio.sleep(0.2)
    assert len(answers.got) == 1  # one answer


async def test_a_failing_answer_does_not_break_the_redis_connection(
        redis_pipeline: Pipeline) -> None:
    """What a request's answer raises inside Redis's read callback (here: two refusals,
    answered there) is reported; it is not taken for Redis's failure: the other replies of
    that read and the connection go on."""
    p = redis_pipeline
    await served(p)
    _, first = await answered(p, chat(p, 1, ONE), "admitting")  # the one request a minute
    assert first.status == 200
    seen: list[int] = []

    def broken(reply: Reply | None, failed: BaseException | None) -> None:
        seen.append(reply.status if reply is not None else 0)
        raise ValueError("a bug in answering")

    handles = [p.serve(chat(p, 2, ONE), broken), p.serve(chat(p, 3, ONE), broken)]
    assert all(isinstance(h, InFlight) and h.admitting is not None for h in handles)
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.02)
    assert seen == [429, 429]
    assert p.admission.failures == 0 and p.admission.open_until == 0.0
    assert (await served(p, 4)).status == 200


# -- a turn's Redis admissions of one org in one call (AdmitBatch, ADMIT_MANY) -------------------

class Monitor:
    """Redis's MONITOR: the commands it ran (Lua's own included), as it prints them."""

    def __init__(self, server: RedisServer) -> None:
        self.sock = socket.create_connection((HOST, server.port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        assert self.sock.recv(5) == b"+OK\r\n"

    def lines(self) -> list[str]:
        self.sock.settimeout(0.3)
        buf = b""
        try:
            while data := self.sock.recv(1 << 16):
                buf += data
        except TimeoutError:
            pass
        self.sock.close()
        return buf.decode(errors="replace").splitlines()


def evalshas(lines: list[str], sha: str) -> int:
    return sum(f'"EVALSHA" "{sha}"' in line for line in lines)


def serve_in_one_turn(p: Pipeline, count: int, first: int = 10
                      ) -> tuple[list[InFlight], list[Answers]]:
    """``count`` requests served in one event-loop turn, as a busy worker takes them (the fast
    server counts them in turn_writes().serving: none of them is alone)."""
    writes = turn_writes(asyncio.get_running_loop())
    writes.serving += count
    try:
        answers = [Answers() for _ in range(count)]
        handles = [p.serve(chat(p, first + i), a) for i, a in enumerate(answers)]
    finally:
        writes.serving -= count
    assert all(isinstance(h, InFlight) and h.admitting is not None for h in handles)
    return handles, answers  # type: ignore[return-value]


async def all_answered(answers: list[Answers]) -> list[Reply]:
    await asyncio.wait_for(asyncio.gather(*(a.event.wait() for a in answers)), 5)
    replies = [a.got[0] for a in answers]
    assert all(len(a.got) == 1 for a in answers) and None not in replies
    return replies  # type: ignore[return-value]


async def releases_sent(p: Pipeline, tries: int = 150) -> None:
    """Wait (polling every 20 ms, at most ``tries`` times) until the admissions the failure
    policy decided have been released on Redis (the breaker's second, then the releases)."""
    for _ in range(tries):
        if not p.admission._releases:
            break
        await asyncio.sleep(0.02)
    assert not p.admission._releases


def reservation_records(redis_server: RedisServer, org: str, rids: list[str]) -> list[bytes]:
    """GET of each reservation record: ``$1 a`` charged, ``$1 r`` a tombstone (released)."""
    return [redis_command(redis_server, "GET", f"apirouter:res:{{{org}}}:{rid}") for rid in rids]


async def test_a_turns_redis_admissions_go_in_one_call_each_decided_on_its_own(
        redis_pipeline: Pipeline, redis_server: RedisServer) -> None:
    """Five requests of a key admitted in one turn of a busy worker: one EVALSHA of
    ADMIT_MANY (none of ADMIT), and each request its own verdict and headers, in order, as
    five ADMIT calls would have had them; a lone request's ADMIT still goes out at once."""
    p = redis_pipeline
    await served(p)  # connects, loads ADMIT and ADMIT_MANY: 119 left
    admit, many = p.admission._sha["admit"], p.admission._sha["admit_many"]
    monitor = Monitor(redis_server)
    _, answers = serve_in_one_turn(p, 5)
    replies = await all_answered(answers)
    assert [r.status for r in replies] == [200] * 5
    assert [int(dict(r.headers)["X-RateLimit-Remaining"]) for r in replies] == [
        118, 117, 116, 115, 114]
    assert all(dict(r.headers)["X-RateLimit-Limit"] for r in replies)
    lines = monitor.lines()
    assert evalshas(lines, many) == 1 and evalshas(lines, admit) == 0
    assert sum('[0 lua] "SET"' in line for line in lines) == 5  # a record each
    # Alone: its ADMIT written at once (nothing queued for the end of the turn).
    p.accounts.flush()
    await asyncio.sleep(0.1)
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None and not redis._proto.waiters
    monitor = Monitor(redis_server)
    alone = Answers()
    handle = p.serve(chat(p, 20), alone)
    assert isinstance(handle, InFlight) and handle.admitting is not None
    assert redis._proto.out == [] and not p.admission._batches
    (reply,) = await all_answered([alone])
    assert int(dict(reply.headers)["X-RateLimit-Remaining"]) == 113
    lines = monitor.lines()
    assert evalshas(lines, admit) == 1 and evalshas(lines, many) == 0


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_redis_connection_lost_with_a_batch_in_flight_decides_and_releases_each(
        redis_pipeline: Pipeline, table_segment: TableWriter, mock: tuple[int, MockState],
        redis_server: RedisServer, policy: str) -> None:
    """The connection drops while Redis holds a batch's call: each of its requests gets the
    failure policy's answer (open: forwarded, without rate-limit headers; closed: 503), once,
    and each reservation is released on Redis (its record a tombstone) once it answers."""
    p = redis_pipeline
    await served(p)
    org = f"acme-{os.urandom(4).hex()}"
    table_segment.publish(redis_table(mock[0], redis_server.url, org,
                                      redis_failure_policy=policy))
    await served(p, 1)  # the same client (same URL), the new table
    assert redis_command(redis_server, "CLIENT", "PAUSE", "300", "ALL").startswith(b"+OK")
    handles, answers = serve_in_one_turn(p, 4)
    rids = [h.admitting.rid for h in handles if h.admitting is not None]
    await asyncio.sleep(0.05)  # the batch written, Redis paused
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None and redis._proto.transport is not None
    batches = [w for w in redis._proto.waiters if isinstance(w, AdmitBatch)]
    assert len(batches) == 1 and len(batches[0].pendings) == 4  # one call for the four
    assert not any(isinstance(w, PendingAdmission) for w in redis._proto.waiters)
    redis._proto.transport.abort()
    replies = await all_answered(answers)
    if policy == "open":
        assert [r.status for r in replies] == [200] * 4
        assert not any(h.startswith("X-RateLimit") for r in replies for h, _ in r.headers)
    else:
        assert [r.status for r in replies] == [503] * 4
    assert p.admission.failures == 4 and "connection lost" in (p.admission.last_error or "")
    assert set(rids) <= set(p.admission._releases)
    await releases_sent(p)
    assert reservation_records(redis_server, org, rids) == [b"$1\r\nr\r\n"] * len(rids)
    assert all(len(a.got) == 1 for a in answers)


async def test_noscript_for_a_batch_loads_the_scripts_again_and_decides_each_on_redis(
        redis_pipeline: Pipeline, redis_server: RedisServer) -> None:
    """Redis flushed its scripts: a batch's ADMIT_MANY gets NOSCRIPT; each of its requests
    takes admit's path (which loads ADMIT and ADMIT_MANY again) and is admitted by Redis,
    charged once; the next turn's batch is one ADMIT_MANY call again."""
    p = redis_pipeline
    await served(p)  # 119 left
    assert redis_command(redis_server, "SCRIPT", "FLUSH").startswith(b"+OK")
    _, answers = serve_in_one_turn(p, 4)
    replies = await all_answered(answers)
    assert [r.status for r in replies] == [200] * 4
    assert sorted(int(dict(r.headers)["X-RateLimit-Remaining"]) for r in replies) == [
        115, 116, 117, 118]
    assert p.admission.failures == 0
    many = p.admission._sha.get("admit_many")
    assert many is not None and p.admission._sha.get("admit") is not None
    monitor = Monitor(redis_server)
    _, answers = serve_in_one_turn(p, 3, 20)
    replies = await all_answered(answers)
    assert [int(dict(r.headers)["X-RateLimit-Remaining"]) for r in replies] == [114, 113, 112]
    assert evalshas(monitor.lines(), many) == 1


async def test_a_hang_up_of_one_request_of_a_batch_releases_only_its_charge(
        redis_pipeline: Pipeline, redis_server: RedisServer, mock: tuple[int, MockState]
        ) -> None:
    """Redis holds a batch of four (paused) and one client hangs up: that request is
    accounted as gone, never answered nor forwarded, and its reservation released; the other
    three are admitted by Redis and answered, their reservations kept."""
    p = redis_pipeline
    await served(p)  # 119 left
    assert redis_command(redis_server, "CLIENT", "PAUSE", "300", "ALL").startswith(b"+OK")
    handles, answers = serve_in_one_turn(p, 4)
    pendings = [h.admitting for h in handles]
    assert None not in pendings
    await asyncio.sleep(0.05)
    gone = handles[1]
    gone.cancel()
    assert gone.ctx.outcome is CLIENT_GONE and gone.ctx.accounted
    kept = [answers[i] for i in (0, 2, 3)]
    replies = await all_answered(kept)
    assert [r.status for r in replies] == [200] * 3
    # Redis ran the four (charging all), then the release of the one: 118, 116, 115
    assert [int(dict(r.headers)["X-RateLimit-Remaining"]) for r in replies] == [118, 116, 115]
    await releases_sent(p, 250)
    assert answers[1].got == []
    org = pendings[0].key.org  # type: ignore[union-attr]
    records = reservation_records(redis_server, org, [q.rid for q in pendings if q is not None])
    assert records == [b"$1\r\na\r\n", b"$1\r\nr\r\n", b"$1\r\na\r\n",
                       b"$1\r\na\r\n"]
    assert mock[1].requests == 4  # the warm-up and the three


async def test_a_turns_admissions_of_an_org_past_admit_many_max_go_in_calls_of_at_most_it(
        redis_pipeline: Pipeline) -> None:
    """Seventy requests of a key in one turn: a call of ADMIT_MANY_MAX (64), then one of the
    other six, each request its own verdict, in order."""
    p = redis_pipeline
    await served(p)  # 119 left
    _, answers = serve_in_one_turn(p, 70)
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None
    assert [len(w.pendings) for w in redis._proto.waiters if isinstance(w, AdmitBatch)] == [
        64, 6]
    replies = await all_answered(answers)
    assert [r.status for r in replies] == [200] * 70
    assert [int(dict(r.headers)["X-RateLimit-Remaining"]) for r in replies] == list(
        range(118, 48, -1))
    # (their settlements done before the loop closes: a task of a closed loop left in
    # workers.admission._pending holds up a later test's finish_pending)
    p.accounts.flush()
    await finish_pending(p.admission, 5)


async def test_a_batch_reply_not_one_per_admission_decides_and_releases_each(
        redis_pipeline: Pipeline, redis_server: RedisServer) -> None:
    """A reply of the batch's call that is not one per admission: each request is decided by
    the failure policy (open: forwarded, without rate-limit headers), once, and released (its
    record a tombstone) - Redis's own reply, when it comes, is dropped."""
    p = redis_pipeline
    await served(p)
    assert redis_command(redis_server, "CLIENT", "PAUSE", "300", "ALL").startswith(b"+OK")
    handles, answers = serve_in_one_turn(p, 3)
    pendings = [h.admitting for h in handles if h.admitting is not None]
    await asyncio.sleep(0.05)  # the batch written, Redis paused
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None
    (batch,) = [w for w in redis._proto.waiters if isinstance(w, AdmitBatch)]
    batch.set_result([[1, 0, 117, 0, 600]])  # one reply for three admissions
    replies = await all_answered(answers)
    assert [r.status for r in replies] == [200] * 3
    assert not any(h.startswith("X-RateLimit") for r in replies for h, _ in r.headers)
    assert "unexpected reply" in (p.admission.last_error or "")
    await releases_sent(p)  # Redis's reply (dropped), the breaker's second, the releases
    for q in pendings:
        assert reservation_records(redis_server, q.key.org, [q.rid]) == [b"$1\r\nr\r\n"]
    assert all(len(a.got) == 1 for a in answers)


async def test_a_batch_failed_in_its_turn_is_not_joined_by_the_turns_later_admissions(
        redis_pipeline: Pipeline) -> None:
    """The connection fails while a batch waits for the turn's write (its one request hung
    up already, so the breaker stays closed): an admission later in the same turn does not
    join that batch (it would never be answered) but is admitted on its own."""
    p = redis_pipeline
    await served(p)
    redis = p.admission.redis
    assert redis is not None and redis._proto is not None
    writes = turn_writes(asyncio.get_running_loop())
    writes.serving += 2
    try:
        gone = p.serve(chat(p, 10), Answers())
        assert isinstance(gone, InFlight) and gone.admitting is not None
        assert p.admission._batches
        gone.cancel()
        redis._proto.connection_lost(None)
        assert p.admission.open_until == 0.0
        later = Answers()
        p.serve(chat(p, 11), later)
    finally:
        writes.serving -= 2
    (reply,) = await all_answered([later])
    assert reply.status == 200 and "X-RateLimit-Remaining" in dict(reply.headers)
