"""Admission: one decision per request over every applicable token bucket, Redis or in-process.

With Redis, one Lua script (one round trip) checks all buckets, charges them all or none, and
records an HMAC nonce if the request carries one; bucket keys of one request share a hash tag
(the org), so the script also runs on Redis Cluster (workers/admission_scripts.py). The common
admissions (buckets only) of one org that a busy worker sends in one event-loop turn go in one
call of its many-admission form, each decided as its own call would have been (AdmitBatch).

A reply from Redis is the decision, however late it arrives: the call has no deadline of its
own. The failure policy (``open``: admit, ``closed``: 503) decides only when Redis is actually
unavailable — the connection is refused or lost, or nothing at all has come back on it for
``redis_timeout_ms`` while replies are owed (apirouter/redis_client.py measures that against
the socket, not against a late event-loop turn), or Redis answers with an error. A connection
found dead opens a breaker: for a second the policy decides at once, then Redis is asked
again. An admission decided without Redis's answer is released on Redis as soon as it answers
again (idempotently, by reservation id): whether its script ran before, after or never, it
leaves no charge.

Without Redis, the in-process limiter keeps the buckets and budget ledgers in the instance's
bucket segment (apirouter/shared_buckets.py), shared by all its workers: each instance
enforces every limit whole, on its own (documented as per-instance); replay protection is
per worker.

Token buckets and budgets are reserved with an estimate at admission and settled to actual
usage after the response (a failed request releases its reservation) off the response path,
into the budget period in which the reservation was made.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from math import ceil
from typing import Any

from apirouter.budgets import Budget, Reservation, period_id, period_ttl_ms
from apirouter.errors import RouterError
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import (
    BucketPlan,
    BucketSpec,
    BucketState,
    Verdict,
    buckets_for,
    kept_plan,
    new_verdict,
    plan_for,
    rate_limit_headers,
)
from apirouter.redis_client import (
    RedisClient,
    RedisError,
    RedisUnavailable,
    bulk_int,
    encode_command,
)
from apirouter.shared_buckets import BUCKETS_SEGMENT_ENV, BucketTable, Records, Settlement
from apirouter.shm import SegmentError
from apirouter.table import Limits
from workers import metric_values
from workers.admission_scripts import (
    ADMIT_LUA,
    ADMIT_MANY_LUA,
    ADMIT_MANY_MAX,
    BUDGET_SETTLE_LUA,
    RELEASE_LUA,
    SETTLE_MANY_LUA,
    SETTLE_MANY_MAX,
    PlannedAdmit,
    ScriptCommands,
    admit_many_command,
    bucket_layout,
    budget_key,
    nonce_key,
    planned_admit,
    reservation_key,
)
from workers.metrics import ADMISSION_DEGRADED, ADMISSION_LATENCY
from workers.turn_writes import turn_writes

log = logging.getLogger("apirouter.admission")

BREAKER_FAILURES = 3  # consecutive error replies that open the breaker
BREAKER_OPEN_S = 1.0
MAX_PENDING_RELEASES = 10_000
RELEASE_BATCH = 64

# ADMISSION_LATENCY.observe without the library's per-call work (a lock, a loop over the
# buckets): ~110 -> ~25 bytecodes an observation, 1 in 8 decisions
_observe_latency = metric_values.observer(ADMISSION_LATENCY)


_UNDECIDED = Verdict(True, None, 0, 0, 0)  # a ticket's verdict until admission decides


class Ticket:
    """What admission reserved, to settle or release after the response.

    A plain class, its optional attributes defaults of the class: a request sets only those
    it has. The common ticket (buckets alone: Admission.admit_now in-process, admit_soon on
    Redis) is made without __init__ and sets four (key, plan, reserved_tokens, verdict), and
    on Redis its reservation id: its buckets are ``plan``'s, the token-buckets charged
    ``reserved_tokens`` (no list of specs a request; ``buckets()`` makes it when wanted). A
    dataclass of its eleven fields cost ~0.35 µs a request more."""

    key: KeyRecord
    specs: list[BucketSpec] = []  # the buckets charged (a planned ticket: plan's) (never grown)
    reserved_tokens: int
    verdict: Verdict = _UNDECIDED  # until admission decides
    plan: BucketPlan | None = None  # the planned buckets (buckets alone)
    budgets: Sequence[Budget] = ()  # (shared empty defaults: no two lists a request)
    reservation: Reservation | None = None
    refused_budget: tuple[Budget, str] | None = None  # (budget, "spend"|"tokens"|"requests")
    charged: bool = True  # False when the failure policy admitted it: nothing to settle
    rid: str = ""  # the reservation id on Redis
    periods: Sequence[str] = ()  # period id per budget, at admission
    headers: list[tuple[str, str]] | None = None  # rate_limit_headers, once made

    def __init__(self, key: KeyRecord, specs: list[BucketSpec], reserved_tokens: int,
                 verdict: Verdict, budgets: Sequence[Budget] = (),
                 reservation: Reservation | None = None, *, rid: str = "",
                 periods: Sequence[str] = ()) -> None:
        self.key = key
        self.specs = specs
        self.reserved_tokens = reserved_tokens
        self.verdict = verdict
        if budgets:
            self.budgets = budgets
        if reservation is not None:
            self.reservation = reservation
        if rid:
            self.rid = rid
        if periods:
            self.periods = periods

    def rate_limit_headers(self) -> list[tuple[str, str]]:
        """The rate-limit headers of an admitted request, made once (the pipeline has them
        made while the backend works, so that the response does not wait for them): none when
        no bucket applies or the failure policy admitted it (nothing is known about the
        buckets then)."""
        headers = self.headers
        if headers is None:
            plan = self.plan
            if plan is None:
                headers = self.headers = ticket_headers(self)
            elif plan.steps and self.charged:
                # limits.planned_headers(plan, self.verdict, time.time()), without its call
                v = self.verdict
                # (f-strings: an int formats as str() makes it, without a call each)
                headers = self.headers = [
                    plan.limit_header, ("X-RateLimit-Remaining", f"{v.remaining}"),
                    ("X-RateLimit-Reset", f"{ceil(time.time() + v.reset_ms / 1000)}"),
                    plan.policy_header]
            else:
                headers = self.headers = []
        return headers

    def buckets(self) -> list[BucketSpec]:
        """The buckets charged: ``specs``, or the plan's with ``reserved_tokens``."""
        plan = self.plan
        return self.specs if plan is None else plan.specs(self.reserved_tokens)


_new_ticket = object.__new__  # a planned Ticket: its attributes set by admit_now, admit_soon
_DIMENSIONS = ("spend", "tokens", "requests")
_NO_LEDGERS: list[tuple[Budget, str]] = []  # a settlement of token buckets alone (never grown)


class PendingAdmission(Ticket):
    """An admission sent to Redis by ``Admission.admit_soon``, and its ticket (a planned one):
    Redis's reply (or the connection's failure) is decided here, in the read callback that
    brings it (the connection's ReplyWaiter), and handed to ``then`` (with itself, the ticket)
    exactly once; ``cancel()`` (the client hung up) drops it and releases whatever Redis may
    charge for it. ``then`` runs inside the Redis connection's read (or failure) callback:
    whatever it raises is logged here, never left to that connection's loop over its replies.
    Made without __init__ by admit_soon, which sets key, plan, reserved_tokens, rid and the
    attributes below but ``task`` (one object a request, not a ticket and a waiter: ~35
    bytecodes a request fewer)."""

    admission: Admission
    limits: Limits
    client: RedisClient  # the one it was sent on (a reload may replace the worker's)
    sha: str
    then: Callable[[Ticket | None, BaseException | None], None] | None
    started: float = 0.0  # perf_counter() when sent, for the sampled latency histogram
    task: asyncio.Future[None] | None = None  # admit's path, after NOSCRIPT

    def done(self) -> bool:
        return self.then is None or self.task is not None

    def set_result(self, reply: object) -> None:
        then = self.then
        if then is None or self.task is not None:
            return
        if type(reply) is list and len(reply) == 5 and reply[0] == 1:
            # Admitted (the common reply): _decide's work inline, with _verdict's and
            # _decided's: ~150 -> ~60 bytecodes a request.
            self.then = None
            a = self.admission
            if a.failures:  # (set, and reset, with last_error)
                a.failures = 0
                a.last_error = None
            self.verdict = new_verdict(Verdict, (True, None, reply[2], 0, reply[4]))
            if self.started:
                _observe_latency(time.perf_counter() - self.started)
            try:
                then(self, None)
            except Exception:
                log.exception("answering a request after its Redis admission failed")
            return
        if isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or flushed its scripts: admit's path loads the script again.
            a = self.admission
            if a._sha.get("admit") is self.sha:
                a._sha.pop("admit", None)
            self.task = spawn(self._again())
            return
        self._decide(reply)

    def set_exception(self, error: BaseException) -> None:
        """The connection failed (or was closed): the failure policy decides, and the
        reservation is released once Redis answers again."""
        if self.done():
            return
        self._decide(error if isinstance(error, Exception) else RedisUnavailable(str(error)))

    def _decide(self, reply: object) -> None:
        """Redis's reply — or the error that stands for it (the failure policy decides) — as
        Admission._admit_redis and Admission.admit take it, to ``then``."""
        then, self.then = self.then, None
        if then is None:
            return
        a, ticket, limits = self.admission, self, self.limits
        try:
            if isinstance(reply, (RedisUnavailable, RedisError, OSError)):
                ticket.verdict = a._undecided(limits, ticket, reply)
            else:
                ticket.verdict = a._verdict(limits, ticket, reply)
        except Exception as e:  # fail-closed, a reservation id reused
            _hand(then, None, e)
            return
        if self.started:
            _observe_latency(time.perf_counter() - self.started)
        _hand(then, ticket, None)

    def cancel(self) -> None:
        """The client hung up before the decision: Redis's reply is dropped when it comes, and
        what the script may charge is released."""
        if self.then is None:
            return
        self.then = None
        self.admission._release(self.limits, self)
        task, self.task = self.task, None
        if task is not None:
            task.cancel()

    async def _again(self) -> None:
        """After NOSCRIPT: ADMIT through ``_run`` (which loads the script) on the client it
        was sent on, as _admit_redis retries."""
        a, ticket = self.admission, self
        reply: object
        try:
            reply = await a._script(self.client, "admit", ADMIT_LUA,
                                    *a._script_args(ticket, None, 0))
        except (RedisUnavailable, RedisError, OSError) as e:
            reply = e
        except Exception as e:  # a failure of ours: the request still gets its one answer
            then, self.then = self.then, None
            if then is not None:
                _hand(then, None, e)
            return
        self._decide(reply)


class AdmitBatch:
    """The admissions of one org that ``Admission.admit_soon`` sends in one event-loop turn on
    one connection, sent together when the turn's commands are written (RedisClient.
    submit_later): one of them as ADMIT (as it was sent alone), two or more (up to
    ADMIT_MANY_MAX) as one ADMIT_MANY call, whose reply holds each one's ADMIT reply. The
    connection's one waiter for that reply: each admission decided as its own reply of ADMIT
    would decide it (PendingAdmission.set_result); a failure of the connection, an error
    reply of the call (NOSCRIPT included) or a reply that is not one per admission, for each
    of them as for a lone one. At c=32 a turn holds several admissions of an org (one key),
    each an ADMIT call: Redis's CPU a call (its TIME, a read and a write of the bucket hash,
    the calls' own machinery) is paid once for all of them."""

    __slots__ = ("admission", "client", "org", "many", "pendings", "commands", "open")

    def __init__(self, admission: Admission, client: RedisClient, org: str, many: str,
                 pending: PendingAdmission, command: PlannedAdmit) -> None:
        self.admission = admission
        self.client = client
        self.org = org
        self.many = many  # ADMIT_MANY's sha
        self.pendings = [pending]
        self.commands = [command]
        self.open = True  # others may join (not written yet, not full)

    def seal(self) -> None:
        self.open = False
        batches = self.admission._batches
        if batches.get(self.org) is self:
            del batches[self.org]

    def encode(self) -> bytes:
        """The command, when the turn's commands are written."""
        self.seal()
        pendings = self.pendings
        if len(pendings) == 1:
            p = pendings[0]
            return self.commands[0].command(p.rid, p.reserved_tokens)
        return admit_many_command(self.many, self.commands, [p.rid for p in pendings],
                                  [p.reserved_tokens for p in pendings])

    def done(self) -> bool:
        return False  # (each admission's own: its set_result ignores a reply not wanted)

    def set_result(self, reply: object) -> None:
        pendings = self.pendings
        if len(pendings) == 1:
            pendings[0].set_result(reply)
            return
        if type(reply) is list and len(reply) == len(pendings):
            for p, r in zip(pendings, reply, strict=True):
                _tell(p.set_result, r)
            return
        # An error reply of the call, for each as ADMIT's own (NOSCRIPT: each loads the
        # scripts again); a reply not one per admission, as _verdict takes a malformed one.
        if not isinstance(reply, RedisError):
            reply = RedisError(f"unexpected reply {reply!r}")
        elif str(reply).startswith("NOSCRIPT"):
            a = self.admission
            if a._sha.get("admit_many") is self.many:
                a._sha.pop("admit_many", None)
        for p in pendings:
            _tell(p.set_result, reply)

    def set_exception(self, error: BaseException) -> None:
        self.seal()
        for p in self.pendings:
            _tell(p.set_exception, error)


async def _load(client: RedisClient, source: str) -> str:
    """SCRIPT LOAD ``source``: its sha."""
    loaded = await client.execute("SCRIPT", "LOAD", source, timeout=None)
    if isinstance(loaded, RedisError):
        raise loaded
    return loaded.decode() if isinstance(loaded, bytes) else str(loaded)


def _tell(method: Callable[[Any], None], value: object) -> None:
    """One admission of a batch told its outcome: what that raises (a bug of ours) must not
    cost the others theirs."""
    try:
        method(value)
    except Exception:
        log.exception("deciding a Redis admission of a batch failed")


def _hand(then: Callable[[Ticket | None, BaseException | None], None], ticket: Ticket | None,
          error: BaseException | None) -> None:
    """``then(ticket, error)``, which must not raise into the Redis connection's callbacks."""
    try:
        then(ticket, error)
    except Exception:
        log.exception("answering a request after its Redis admission failed")


def ticket_headers(ticket: Ticket) -> list[tuple[str, str]]:
    """Rate-limit headers of an admitted request: none when no bucket applies or the failure
    policy admitted it (nothing is known about the buckets then)."""
    if not ticket.specs or not ticket.charged:
        return []
    return rate_limit_headers(ticket.specs[0], ticket.verdict, time.time())


class Admission:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the one it always runs on (the worker's); else it asks for the running one
        each time (~0.2 µs: asyncio's check for a fork is a getpid system call)."""
        self.loop = loop
        self.redis: RedisClient | None = None
        self._redis_url = ""
        self._limits: Limits | None = None  # the limits client_for last took
        self._sha: dict[str, str] = {}
        self._commands = ScriptCommands()
        self.table = _bucket_table()
        self.failures = 0
        self.open_until = 0.0
        self.last_error: str | None = None
        self._decisions = 0
        self._nonces: dict[str, float] = {}
        self._rid_prefix = f"{os.getpid():x}.{os.urandom(4).hex()}."
        self._rid_next = 0
        self._releases: dict[str, Ticket] = {}  # decided without Redis: release when it answers
        self._batches: dict[str, AdmitBatch] = {}  # by org: this turn's, still open (admit_soon)
        self._releasing: asyncio.Future[None] | None = None
        self._settlements: list[Settlement] = []  # in-process, applied by settle_queued
        # in-process, of planned tickets: (the plan's token-buckets, their token delta)
        self._bucket_settlements: list[tuple[Records, int]] = []
        # With Redis: (ticket, token buckets, token delta, ledger delta), sent once a turn
        self._redis_settlements: list[tuple[Ticket, list[BucketSpec], int,
                                            tuple[int, int, int] | None]] = []
        # With Redis, of planned tickets (admit_soon): their plan's command, the token delta
        self._planned_settlements: list[tuple[PlannedAdmit, int]] = []
        self._redis_settling: Limits | None = None  # the limits those were admitted on
        # What is still to be settled, settled first by budget_usage (workers.accounting's
        # flush: with Redis it waits a few milliseconds)
        self.before_read: Callable[[], None] | None = None

    # -- configuration --------------------------------------------------------------------------

    def client_for(self, limits: Limits) -> RedisClient | None:
        """The Redis client of ``limits`` (None: in-process), made or replaced when its URL
        changes. The same limits as last time (frozen: one object a table) answer at once;
        the pipeline asks twice a request."""
        if limits is self._limits:
            return self.redis
        if limits.redis_url != self._redis_url:
            old = self.redis
            self.redis = RedisClient(limits.redis_url, lone=_lone(
                asyncio.get_running_loop())) if limits.redis_url else None
            self._redis_url = limits.redis_url
            self._sha.clear()
            self._releases.clear()
            if old is not None:
                # Last: closing answers the admissions pending on it (the failure policy),
                # whose requests may go on to admit others, on the new client.
                old.close()
        if self.redis is not None:
            self.redis.stall_timeout = limits.redis_timeout_ms / 1000
        self._limits = limits
        return self.redis

    def status(self, limits: Limits) -> dict[str, object]:
        if not limits.redis_url:
            return {"status": "ok", "backend": "in-process",
                    "semantics": "per instance: this instance's workers share every limit "
                                 "(other instances enforce their own)" if self.table.shared
                                 else "per process: this process enforces every limit"}
        broken = self.open_until > time.monotonic() or self.failures > 0
        return {"status": "degraded" if broken else "ok", "backend": "redis",
                "breaker": "open" if self.open_until > time.monotonic() else "closed",
                "policy": limits.redis_failure_policy, "last_error": self.last_error,
                "releases_pending": len(self._releases)}

    # -- decisions ------------------------------------------------------------------------------

    async def admit(self, limits: Limits, key: KeyRecord, model: str, tokens: int,
                    org: Tier | None, model_limits: Tier | None,
                    nonce: str | None = None, nonce_ttl_ms: int = 0,
                    budgets: list[Budget] | None = None,
                    reservation: Reservation | None = None) -> Ticket:
        client = self.client_for(limits)
        if client is None and not budgets and nonce is None:
            ticket = self.admit_now(limits, key, model, tokens, org, model_limits)
            assert ticket is not None  # (in-process)
            return ticket
        budgets = budgets or []
        now = time.time()
        periods = [period_id(b.period, now) for b in budgets]
        if client is None:
            # In-process: the instance's shared buckets.
            specs = buckets_for(key, model, tokens, org, model_limits)
            ticket = Ticket(key, specs, tokens, _UNDECIDED, budgets, reservation,
                            periods=periods)
            ticket.verdict = self._admit_local(ticket, nonce, nonce_ttl_ms)
            return ticket
        specs = buckets_for(key, model, tokens, org, model_limits)
        ticket = Ticket(key, specs, tokens, _UNDECIDED, budgets, reservation,
                        rid=self._next_rid(), periods=periods)
        started = time.perf_counter()
        ticket.verdict = await self._admit_redis(client, limits, ticket, nonce, nonce_ttl_ms,
                                                 model, org, model_limits)
        self._decided(started)
        return ticket

    def _decided(self, started: float) -> None:
        """A Redis decision that took since ``started`` (perf_counter): a sampled histogram,
        1 in 8 decisions."""
        self._decisions += 1
        if not self._decisions & 7:
            _observe_latency(time.perf_counter() - started)

    def admit_now(self, limits: Limits, key: KeyRecord, model: str, tokens: int,
                  org: Tier | None, model_limits: Tier | None) -> Ticket | None:
        """The common decision without a coroutine (in-process, buckets only: the caller has
        no budget and no nonce), or None when ``admit`` must take it (Redis). Each coroutine
        level between the pipeline and the decision cost ~0.3 µs a request."""
        if (limits.redis_url or self._redis_url) and (
                self.redis if limits is self._limits else self.client_for(limits)) is not None:
            return None
        if tokens <= 0:  # (token-buckets drop out; never from the pipeline: it estimates >= 1)
            specs = buckets_for(key, model, tokens, org, model_limits)
            return Ticket(key, specs, tokens,
                          self.table.admit(specs, [], None, time.monotonic() * 1000)[0])
        # Straight to the shared buckets: the request's plan charged as it is, its ticket a
        # planned one. (plan_for, its lookup inline)
        plan = kept_plan((key.key_id, key.org, model))
        if plan is None or plan.key_limits is not key.limits or plan.org is not org or \
                plan.model_limits is not model_limits:
            plan = plan_for(key, model, org, model_limits)
        ticket: Ticket = _new_ticket(Ticket)
        ticket.key = key
        ticket.plan = plan
        ticket.reserved_tokens = tokens
        ticket.verdict = self.table.take_planned(plan, tokens, time.monotonic() * 1000)
        return ticket

    def admit_soon(self, limits: Limits, key: KeyRecord, model: str, tokens: int,
                   org: Tier | None, model_limits: Tier | None,
                   then: Callable[[Ticket | None, BaseException | None], None]
                   ) -> PendingAdmission | None:
        """``admit`` on Redis without a coroutine, for the common decision (buckets only: the
        caller has no budget and no nonce): ADMIT's command goes out now (or with the turn's
        other commands: RedisClient's coalescing), and ``then(ticket, None)`` — or
        ``then(None, error)``: fail-closed — runs in the read callback of Redis's reply.
        None when ``admit`` must take it: no live connection, the script not loaded yet, the
        breaker open. Awaited in a task, the command waited for the task's first step and the
        reply for its second (each through the loop's ready queue and four coroutine frames),
        with a future between reply and task."""
        client = self.redis if limits is self._limits else self.client_for(limits)
        sha = self._sha.get("admit")
        if client is None or sha is None or tokens <= 0:
            return None
        if self.open_until:  # (zeroed once past: no clock read a request while closed)
            if self.open_until > time.monotonic():
                return None
            self.open_until = 0.0
        # The request's plan and its command kept with it: a planned ticket (as admit_now's),
        # the command one template with the reservation id and the token count spliced in.
        # (plan_for, its lookup inline)
        plan = kept_plan((key.key_id, key.org, model))
        if plan is None or plan.key_limits is not key.limits or plan.org is not org or \
                plan.model_limits is not model_limits:
            plan = plan_for(key, model, org, model_limits)
        self._rid_next = n = self._rid_next + 1
        rid = f"{self._rid_prefix}{n:x}"  # (_next_rid's)
        pending: PendingAdmission = _new_ticket(PendingAdmission)
        pending.key = key
        pending.plan = plan
        pending.reserved_tokens = tokens
        pending.rid = rid  # (its verdict: the class's, _UNDECIDED)
        pending.admission = self
        pending.limits = limits
        pending.client = client
        pending.sha = sha
        pending.then = then
        if not n & 7:  # the latency histogram sampled 1 in 8 (a clock read a request fewer)
            pending.started = time.perf_counter()
        command = plan.redis
        if command is None or command.sha != sha:  # (planned_admit's check, without its call)
            command = planned_admit(plan, key.org, sha)
        # With the turn's other admissions of its org (AdmitBatch), if there is one still
        # open; else the first of a batch when its command would wait for the turn's write
        # anyway (submit_later); else (alone: it goes out at once) one ADMIT call.
        batch = self._batches.get(key.org) if self._batches else None
        if batch is not None and batch.open and batch.client is client:
            batch.pendings.append(pending)
            batch.commands.append(command)
            if len(batch.pendings) >= ADMIT_MANY_MAX:
                batch.seal()
            return pending
        many = self._sha.get("admit_many")
        if many is None or not client.queues():
            if not client.submit_waiter(command.command(rid, tokens), pending):
                return None
            return pending
        batch = AdmitBatch(self, client, key.org, many, pending, command)
        if not client.submit_later(batch.encode, batch):
            return None
        if batch.open:  # (not written at once)
            self._batches[key.org] = batch
        return pending

    def local_bucket(self, name: str) -> BucketState | None:
        """The in-process limiter's state of one bucket (None: never charged, so full)."""
        return self.table.bucket(name, time.monotonic() * 1000)

    def _admit_local(self, ticket: Ticket, nonce: str | None, nonce_ttl_ms: int) -> Verdict:
        if nonce is not None:
            # Without Redis, replay protection covers this worker only (documented).
            now = time.monotonic()
            if self._nonces.get(nonce, 0.0) > now:
                raise RouterError("INVALID_REQUEST", "this request's nonce was already used "
                                                     "(a replay)", field="X-Signature-Nonce")
            self._nonces[nonce] = now + nonce_ttl_ms / 1000
            if len(self._nonces) > 4096 and len(self._nonces) % 1024 == 0:
                self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        verdict, ticket.refused_budget = self.table.admit(
            ticket.specs, list(zip(ticket.budgets, ticket.periods, strict=True)),
            ticket.reservation, time.monotonic() * 1000)
        return verdict

    def ledger(self, b: Budget) -> dict[str, int]:
        """In-process: what this instance used of ``b`` in the current period."""
        return self.table.used(b, period_id(b.period), time.monotonic() * 1000)

    async def _script(self, client: RedisClient, name: str, source: str,
                      keys: list[str], args: list[str | int | float]) -> object:
        """Run a script; with no deadline of its own: Redis's reply is awaited while the
        connection lives (RedisClient.stall_timeout)."""
        return await self._run(client, name, source, lambda sha: encode_command(
            "EVALSHA", sha, len(keys), *keys, *args))

    async def _run(self, client: RedisClient, name: str, source: str,
                   encode: Callable[[str], bytes]) -> object:
        """``_script`` for a command ``encode(sha)`` makes (EVALSHA, the script's sha, ...)."""
        sha = self._sha.get(name)
        if sha is None:
            sha = self._sha[name] = await _load(client, source)
            if name == "admit":
                # ADMIT_MANY (admit_soon's batches) loaded with ADMIT, every time: after
                # NOSCRIPT (Redis restarted, or flushed its scripts) both are gone. Without it
                # admissions go one a call; nothing waits on it.
                try:
                    self._sha["admit_many"] = await _load(client, ADMIT_MANY_LUA)
                except (RedisUnavailable, RedisError, OSError) as e:
                    log.warning("loading the batched admission script failed (%s): "
                                "admissions go one a call", e)
        # On a live connection, straight to its pipeline (the same wait as execute's
        # timeout=None, two coroutines fewer); execute connects first when there is none.
        data = encode(sha)
        fut = client.submit_encoded(data)
        reply = await (fut if fut is not None else client.execute_encoded(data, timeout=None))
        if isinstance(reply, RedisError):
            if str(reply).startswith("NOSCRIPT"):
                self._sha.pop(name, None)
                return await self._run(client, name, source, encode)
            raise reply
        return reply

    def _script_args(self, ticket: Ticket, nonce: str | None, nonce_ttl_ms: int
                     ) -> tuple[list[str], list[str | int | float]]:
        """KEYS and ARGV of the admission and release scripts (admission_scripts layout)."""
        key, specs = ticket.key, ticket.buckets()
        r = ticket.reservation
        budgets = ticket.budgets if r is not None else []
        keys, places = bucket_layout(key.org, [s.name for s in specs])
        h = len(keys)
        keys += [budget_key(key.org, b.scope, p)
                 for b, p in zip(budgets, ticket.periods, strict=True)]
        keys.append(reservation_key(key.org, ticket.rid))
        if nonce is not None:
            keys.append(nonce_key(key.org, key.key_id, nonce))
        args: list[str | int | float] = [h, len(specs), len(budgets),
                                         nonce_ttl_ms if nonce else 0]
        for (k, o), s in zip(places, specs, strict=True):
            args += [k, o, s.capacity, s.per_minute, s.cost]
        for b in budgets:
            assert r is not None
            args += [b.spend_micro, b.tokens, b.requests, r.spend_micro, r.tokens, r.requests,
                     period_ttl_ms(b.period)]
        return keys, args

    async def _admit_redis(self, client: RedisClient, limits: Limits, ticket: Ticket,
                           nonce: str | None, nonce_ttl_ms: int, model: str,
                           org: Tier | None, model_limits: Tier | None) -> Verdict:
        if self.open_until > time.monotonic():
            ticket.charged = False
            return self._on_failure(limits, None)
        try:
            # The script loaded and a live connection: its command, from kept fragments,
            # straight into the connection's pipeline. Otherwise (and on NOSCRIPT) _run
            # loads the script and connects.
            sha = self._sha.get("admit")
            fut = None if sha is None else client.submit_encoded(self._commands.command(
                sha, ticket.key, model, org, model_limits, ticket.specs, ticket.rid, nonce,
                nonce_ttl_ms, ticket.budgets, ticket.periods, ticket.reservation))
            if fut is not None:
                reply = await fut
                if isinstance(reply, RedisError):
                    if not str(reply).startswith("NOSCRIPT"):
                        raise reply
                    if self._sha.get("admit") is sha:
                        self._sha.pop("admit", None)
                    fut = None
            if fut is None:
                reply = await self._run(client, "admit", ADMIT_LUA, lambda sha: (
                    self._commands.command(sha, ticket.key, model, org, model_limits,
                                           ticket.specs, ticket.rid, nonce, nonce_ttl_ms,
                                           ticket.budgets, ticket.periods,
                                           ticket.reservation)))
        except (RedisUnavailable, RedisError, OSError) as e:
            return self._undecided(limits, ticket, e)
        except asyncio.CancelledError:
            self._release(limits, ticket)
            raise
        return self._verdict(limits, ticket, reply)

    def _next_rid(self) -> str:
        """A reservation id unique to this worker."""
        self._rid_next += 1
        return f"{self._rid_prefix}{self._rid_next:x}"

    def _release(self, limits: Limits, ticket: Ticket) -> None:
        """An admission whose answer will not be used: nothing to settle, and what the script
        may still charge (or has charged) inside Redis is released there."""
        ticket.charged = False
        self._release_later(limits, ticket)

    def _undecided(self, limits: Limits, ticket: Ticket, error: Exception) -> Verdict:
        """The failure policy's verdict for an admission Redis did not decide (released)."""
        self._release(limits, ticket)
        return self._on_failure(limits, error)

    def _verdict(self, limits: Limits, ticket: Ticket, reply: object) -> Verdict:
        """The decision in ADMIT's reply (a refused nonce raises its catalog error)."""
        if not isinstance(reply, list) or len(reply) != 5:
            return self._undecided(limits, ticket, RedisError(f"unexpected reply {reply!r}"))
        self.failures = 0
        self.last_error = None
        code, index, remaining, retry, reset = map(int, reply)
        if code == 1:
            return Verdict(True, None, remaining, 0, reset)
        if code == -1:
            raise RouterError("INVALID_REQUEST", "this request's nonce was already used "
                                                 "(a replay)", field="X-Signature-Nonce")
        if code == 2:
            ticket.refused_budget = (ticket.budgets[index - 1], _DIMENSIONS[remaining - 1])
            return Verdict(False, None, 0, 0, 0)
        if code == 3:  # a reservation id used twice: cannot happen (ids are unique)
            raise RedisError("reservation id reused")
        return Verdict(False, ticket.buckets()[index - 1], remaining, retry, reset)

    def _on_failure(self, limits: Limits, error: Exception | None) -> Verdict:
        if error is not None:
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"[:200]
            # Unavailable (refused, lost, silent for redis_timeout_ms) opens the breaker at
            # once; error replies only after a few in a row.
            if isinstance(error, RedisUnavailable | OSError) or \
                    self.failures >= BREAKER_FAILURES:
                if self.open_until <= time.monotonic():
                    log.error("Redis admission failing (%s); breaker open for %.0f s, policy "
                              "fail-%s", self.last_error, BREAKER_OPEN_S,
                              limits.redis_failure_policy)
                self.open_until = time.monotonic() + BREAKER_OPEN_S
        ADMISSION_DEGRADED.labels(limits.redis_failure_policy).inc()
        if limits.redis_failure_policy == "closed":
            raise RouterError("SERVICE_UNAVAILABLE", "admission control is unavailable and "
                                                     "the policy is fail-closed")
        return Verdict(True, None, 0, 0, 0)

    # -- releases of admissions decided without Redis's answer ------------------------------

    def _release_later(self, limits: Limits, ticket: Ticket) -> None:
        if len(self._releases) >= MAX_PENDING_RELEASES:
            dropped = next(iter(self._releases))
            del self._releases[dropped]
            log.warning("over %d admissions wait for release on Redis; dropped the oldest "
                        "(its charge may stay)", MAX_PENDING_RELEASES)
        self._releases[ticket.rid] = ticket
        if self._releasing is None or self._releasing.done():
            self._releasing = spawn(self._drain_releases(limits))

    async def _drain_releases(self, limits: Limits) -> None:
        """Release pending reservations on Redis, a batch at a time, once the breaker lets
        Redis be asked again; retried until Redis has answered each one."""
        while self._releases:
            wait = self.open_until - time.monotonic()
            await asyncio.sleep(max(0.0, wait))
            # The current client: a reload that moved the worker to another Redis (or off
            # Redis) emptied _releases, so what is left was decided on this one.
            client = self.redis
            if client is None:
                self._releases.clear()
                return
            batch = list(self._releases.values())[:RELEASE_BATCH]
            results = await asyncio.gather(
                *(self._script(client, "release", RELEASE_LUA,
                               *self._script_args(t, None, 0)) for t in batch),
                return_exceptions=True)
            failed = False
            for t, res in zip(batch, results, strict=True):
                if isinstance(res, BaseException):
                    failed = True
                else:
                    self._releases.pop(t.rid, None)
            if failed:
                await asyncio.sleep(BREAKER_OPEN_S)

    # -- after the response ---------------------------------------------------------------------

    def queue_settlement(self, limits: Limits, ticket: Ticket, actual_tokens: int,
                         actual_spend_micro: int | None) -> None:
        """Queue the correction of token buckets and budgets from the reservation to what the
        request really used (0 tokens and no spend for a failed request: its reservation is
        released); ``settle_queued`` applies the queue (in-process) or sends it (Redis, in the
        background: never delaying a response). workers.accounting queues a turn's requests
        and settles them, at the end of the turn; scheduled on its own from there, a
        settlement ran one loop iteration later, after a poll for I/O (at c=1, a system call
        a request)."""
        plan = ticket.plan
        if plan is not None:  # buckets alone: in-process (admit_now), or on Redis (admit_soon)
            delta = actual_tokens - ticket.reserved_tokens
            if delta and ticket.verdict.allowed:
                if not ticket.rid:
                    if plan.token_records:
                        self._bucket_settlements.append((plan.token_records, delta))
                elif ticket.charged and plan.redis.token_buckets and \
                        limits.redis_url == self._redis_url:  # (_settles_on)
                    if self._redis_settling is None:
                        self._redis_settling = limits
                    self._planned_settlements.append((plan.redis, delta))
            return
        if not ticket.verdict.allowed or not ticket.charged:
            return
        delta = actual_tokens - ticket.reserved_tokens
        specs = [s for s in ticket.specs if s.name.endswith(":tpm")] if delta else []
        r = ticket.reservation
        budget_delta = None
        if r is not None and ticket.budgets:
            failed = actual_tokens == 0
            budget_delta = ((actual_spend_micro or 0) - r.spend_micro,
                            actual_tokens - r.tokens, -r.requests if failed else 0)
        if not limits.redis_url:  # admitted in-process
            if specs or budget_delta is not None:
                self._settlements.append(
                    (specs, delta, list(zip(ticket.budgets, ticket.periods, strict=True))
                     if budget_delta is not None else _NO_LEDGERS, budget_delta))
            return
        if (specs or budget_delta is not None) and self._settles_on(limits):
            if self._redis_settling is None:
                self._redis_settling = limits
            self._redis_settlements.append((ticket, specs, delta, budget_delta))

    def settle_queued(self) -> None:
        """Apply the queued in-process settlements together, under one round of stripe locks;
        send the queued Redis ones together (_settle_redis)."""
        try:
            if self._bucket_settlements:
                items, self._bucket_settlements = self._bucket_settlements, []
                self.table.settle_records(items, time.monotonic() * 1000)
            if self._settlements:
                self.apply_settlements()
        finally:  # (one kind failing must not leave the other unsent: a reload between both)
            if self._redis_settling is not None:
                self._settle_redis(self._redis_settling)

    def _settles_on(self, limits: Limits) -> bool:
        """Whether what was admitted on ``limits``' Redis can still be settled there: not when a
        reload has moved this worker to another Redis since (its reservation stays on the old
        one). Switching the client back for it (client_for) would close the new one and fail
        the admissions waiting on it."""
        return limits.redis_url == self._redis_url

    def apply_settlements(self) -> None:
        items, self._settlements = self._settlements, []
        if items:
            self.table.settle_many(items, time.monotonic() * 1000)

    def _settle_redis(self, limits: Limits) -> None:
        """Settle on Redis everything queued in one event-loop turn: the token buckets of each
        org in one script call (SETTLE_MANY_LUA, in order: as one call per bucket would), each
        budget ledger in one of its own; every call is sent at once (one write, no task per
        request or turn: the replies are looked at when the last one is in). One call per
        bucket was a script run, an encoding and a reply per request."""
        items, self._redis_settlements = self._redis_settlements, []
        planned, self._planned_settlements = self._planned_settlements, []
        self._redis_settling = None
        client = self.client_for(limits) if self._settles_on(limits) else None
        if client is None:
            return
        commands = self._commands
        calls: list[tuple[str, str, str, Callable[[str], bytes]]] = []
        buckets: dict[str, tuple[list[bytes], list[bytes]]] = {}  # by org
        for ticket, specs, delta, budget_delta in items:
            org = ticket.key.org
            if budget_delta is not None:
                # Into the period of the reservation, even when the response came after
                # midnight.
                for b, period in zip(ticket.budgets, ticket.periods, strict=True):
                    calls.append((f"budget {b.scope}", "budget_settle", BUDGET_SETTLE_LUA,
                                  partial(_evalsha, [budget_key(org, b.scope, period)],
                                          list(budget_delta))))
            if specs:
                keys, args = buckets.get(org) or buckets.setdefault(org, ([], []))
                d = bulk_int(delta)
                for s in specs:
                    k, fixed = commands.bucket(org, s)
                    keys.append(k)
                    args.append(fixed + d)
        # The planned ones (admit_soon's), their fragments kept with their plans: after the
        # others of their org (each a request's own correction: no order between requests)
        # (bulk_int's encoding inline; a turn's are mostly of one org and one token-bucket
        # a plan: ~60 -> ~35 bytecodes a request)
        at: str | None = None  # the org whose lists keys and args are
        for p, delta in planned:
            if p.org is not at:
                at = p.org
                keys, args = buckets.get(at) or buckets.setdefault(at, ([], []))
            keys += p.settle_keys
            d = b"$%d\r\n%d\r\n" % (len(b"%d" % delta), delta)
            one = p.settle_one
            if one is not None:
                args.append(one + d)
            else:
                args += [fixed + d for fixed in p.settle_fixed]
        for org, (keys, args) in buckets.items():
            for start in range(0, len(keys), SETTLE_MANY_MAX):
                end = start + SETTLE_MANY_MAX
                calls.append((f"{len(keys[start:end])} token buckets of org {org}",
                              "settle_many", SETTLE_MANY_LUA,
                              partial(commands.settle_many, keys=keys[start:end],
                                      args=args[start:end])))
        sent: list[asyncio.Future[Any] | None] = [
            None if (sha := self._sha.get(name)) is None else client.submit_encoded(encode(sha))
            for _, name, _, encode in calls]
        last = sent[-1] if sent else None
        if last is None or None in sent:  # not loaded yet, or not connected: _run does both
            spawn(self._settle_slowly(client, calls, sent))
            return
        _pending.add(last)  # (finish_pending waits for it)
        last.add_done_callback(lambda _: self._settled(client, calls, sent, last))

    def _settled(self, client: RedisClient, calls: list[tuple[str, str, str,
                                                               Callable[[str], bytes]]],
                 sent: list[asyncio.Future[Any] | None], last: asyncio.Future[Any]
                 ) -> None:
        """The replies of one turn's settlements are in (in order: the last one means all):
        errors are logged; a script Redis no longer has is loaded and run again."""
        _pending.discard(last)
        if any(f is not None and (f.cancelled() or f.exception() is not None or
                                  isinstance(f.result(), RedisError)) for f in sent):
            spawn(self._settle_slowly(client, calls, sent))

    async def _settle_slowly(self, client: RedisClient,
                             calls: list[tuple[str, str, str, Callable[[str], bytes]]],
                             sent: list[asyncio.Future[Any] | None]) -> None:
        """The settlement calls of one turn that were not sent, or came back with an error:
        run through _run (which loads the script and connects), or logged."""
        reloaded: set[str] = set()
        for (what, name, source, encode), fut in zip(calls, sent, strict=True):
            try:
                if fut is None:
                    await self._run(client, name, source, encode)
                    continue
                reply = await fut
                if isinstance(reply, RedisError) and str(reply).startswith("NOSCRIPT"):
                    if name not in reloaded:  # once a batch: the calls after find it loaded
                        reloaded.add(name)
                        self._sha.pop(name, None)
                    await self._run(client, name, source, encode)
                elif isinstance(reply, RedisError):
                    raise reply
            except (RedisUnavailable, RedisError, OSError) as e:
                log.warning("could not settle %s: %s", what, e)


def _evalsha(keys: list[str], args: list[str | int | float], sha: str) -> bytes:
    return encode_command("EVALSHA", sha, len(keys), *keys, *args)


def _lone(loop: asyncio.AbstractEventLoop) -> Callable[[], bool]:
    """Whether the request admitting now is the only one the server is answering: an idle
    Redis connection's command goes out at once for it, else at the end of the loop turn
    with the others' (workers.turn_writes decides its writes the same way). At c=32 (python -m
    bench.overhead --redis --connections 32, 3 runs each) one write a turn instead of two cut
    router CPU per request 90.8 -> 89.1 µs."""
    writes = turn_writes(loop)
    return lambda: writes.serving <= 1


def _bucket_table() -> BucketTable:
    """The instance's bucket segment (the supervisor names it), else one of this process."""
    name = os.environ.get(BUCKETS_SEGMENT_ENV)
    if name:
        try:
            return BucketTable.attach(name)
        except (SegmentError, OSError) as e:
            log.error("cannot attach the bucket segment %s (%s): limits are per process", name,
                      e)
    return BucketTable.private()


async def finish_pending(admission: Admission, timeout: float) -> None:
    """At shutdown: apply queued in-process settlements and wait (bounded) for the background
    settlements and releases still running, so a draining worker's last refunds and charges
    are not dropped."""
    admission.settle_queued()  # (the Redis ones go out, into _pending)
    if _pending:
        await asyncio.wait(set(_pending), timeout=timeout)


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run settlement off the response path; keep a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return task


_pending: set[asyncio.Future[Any]] = set()


async def budget_usage(admission: Admission, limits: Limits, budgets: list[Budget],
                       org_of: dict[str, str]) -> list[dict[str, object]]:
    """Spend and remaining per budget for the admin API (the current period)."""
    if admission.before_read is not None:  # what is queued goes first (on one connection)
        admission.before_read()
    client = admission.client_for(limits)
    out = []
    for b in budgets:
        if client is None:
            used = dict(admission.ledger(b))
            scope_note = ("this instance (in-process limiter)" if admission.table.shared
                          else "this process (in-process limiter)")
        else:
            org = org_of.get(b.scope, b.scope.split(":", 1)[1])
            reply = await client.execute("HMGET", budget_key(org, b.scope, period_id(b.period)),
                                         *_DIMENSIONS, timeout=None)
            if isinstance(reply, RedisError) or not isinstance(reply, list):
                raise RedisUnavailable(str(reply))
            used = {d: int(v or 0) for d, v in zip(_DIMENSIONS, reply, strict=True)}
            scope_note = "all routers sharing this Redis"
        limits_of = {"spend": b.spend_micro, "tokens": b.tokens, "requests": b.requests}
        row: dict[str, object] = {"scope": b.scope, "period": b.period,
                                  "period_id": period_id(b.period), "covers": scope_note}
        for d in _DIMENSIONS:
            limit = limits_of[d]
            scale = 1_000_000 if d == "spend" else 1
            row[d] = {"used": used[d] / scale,
                      "limit": None if limit < 0 else limit / scale,
                      "remaining": None if limit < 0 else max(0, limit - used[d]) / scale}
        out.append(row)
    return out
