"""Admission: one decision per request over every applicable token bucket, Redis or in-process.

With Redis, one Lua script (one round trip) checks all buckets, charges them all or none, and
records an HMAC nonce if the request carries one; bucket keys of one request share a hash tag
(the org), so the script also runs on Redis Cluster. Redis is given ``redis_timeout_ms``; if it
does not answer, the configured policy decides (``open``: admit, ``closed``: 503) and a breaker
stops asking a dead Redis for a second before probing it again. Without Redis, the in-process
limiter gives each worker an equal share of every limit, so one instance as a whole admits
about the configured rate (documented as per-instance).

Token buckets are reserved with an estimate at admission and settled to actual usage after the
response (a failed request releases its reservation) off the response path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from apirouter.budgets import Budget, Reservation, period_id, period_ttl_ms, refused
from apirouter.errors import RouterError
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketSpec, BucketState, Verdict, buckets_for, settle, take_all
from apirouter.redis_client import RedisClient, RedisError, RedisUnavailable
from apirouter.table import Limits
from workers.metrics import ADMISSION_DEGRADED, ADMISSION_LATENCY

log = logging.getLogger("apirouter.admission")

BREAKER_FAILURES = 3
BREAKER_OPEN_S = 1.0
BUCKET_TTL_MS = 180_000  # idle buckets are full again by then: let Redis forget them

ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local levels = {}
for i = 1, n do
  local b = 3 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local s = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens = cap
  if s[1] then
    tokens = math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
  end
  if tokens < cost then
    local retry, reset = 60000, 0
    if rate > 0 then
      retry = math.ceil((cost - tokens) / rate)
      reset = math.ceil((cap - tokens) / rate)
    end
    return {0, i, math.floor(math.max(0, tokens)), retry, reset}
  end
  levels[i] = tokens
end
local m = tonumber(ARGV[3])
local bb = 3 + n * 3
for j = 1, m do
  local a = bb + (j - 1) * 7
  local used = redis.call('HMGET', KEYS[n + j], 'spend', 'tokens', 'requests')
  for d = 1, 3 do
    local limit, need = tonumber(ARGV[a + d]), tonumber(ARGV[a + 3 + d])
    if limit >= 0 and (tonumber(used[d]) or 0) + need > limit then
      return {2, j, d, 0, 0}
    end
  end
end
local nonce_ttl = tonumber(ARGV[2])
if nonce_ttl > 0 then
  if not redis.call('SET', KEYS[n + m + 1], '1', 'NX', 'PX', nonce_ttl) then
    return {-1, 0, 0, 0, 0}
  end
end
for j = 1, m do
  local a = bb + (j - 1) * 7
  redis.call('HINCRBY', KEYS[n + j], 'spend', ARGV[a + 4])
  redis.call('HINCRBY', KEYS[n + j], 'tokens', ARGV[a + 5])
  redis.call('HINCRBY', KEYS[n + j], 'requests', ARGV[a + 6])
  redis.call('PEXPIRE', KEYS[n + j], ARGV[a + 7])
end
local first_left, first_reset = 0, 0
for i = 1, n do
  local b = 3 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local left = levels[i] - cost
  redis.call('HSET', KEYS[i], 't', string.format('%.6f', left), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], %(ttl)d)
  if i == 1 then
    first_left = left
    if rate > 0 then first_reset = math.ceil((cap - left) / rate) end
  end
end
return {1, 0, math.floor(math.max(0, first_left)), 0, first_reset}
""".replace("%(ttl)d", str(BUCKET_TTL_MS))

BUDGET_SETTLE_LUA = """
redis.call('HINCRBY', KEYS[1], 'spend', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[3])
return 1
"""

SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap, rate, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = cap
if s[1] then
  tokens = math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
end
tokens = math.min(cap, tokens - delta)
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass(slots=True)
class Ticket:
    """What admission reserved, to settle or release after the response."""

    key: KeyRecord
    specs: list[BucketSpec]
    reserved_tokens: int
    verdict: Verdict
    budgets: list[Budget] = field(default_factory=list)
    reservation: Reservation | None = None
    refused_budget: tuple[Budget, str] | None = None  # (budget, "spend"|"tokens"|"requests")
    charged: bool = True  # False when the failure policy admitted it: nothing to settle


def redis_key(key: KeyRecord, bucket: str) -> str:
    # The {org} hash tag keeps all buckets of one request in one Redis Cluster slot.
    return f"apirouter:rl:{{{key.org}}}:{bucket}"


def budget_key(org: str, budget: Budget, now: float | None = None) -> str:
    return f"apirouter:budget:{{{org}}}:{budget.scope}:{period_id(budget.period, now)}"


_DIMENSIONS = ("spend", "tokens", "requests")


class Admission:
    def __init__(self) -> None:
        self.redis: RedisClient | None = None
        self._redis_url = ""
        self._sha: dict[str, str] = {}
        self._local: dict[str, BucketState] = {}
        self.failures = 0
        self.open_until = 0.0
        self.last_error: str | None = None
        self._decisions = 0
        self._nonces: dict[str, float] = {}
        self._used: dict[tuple[str, str], dict[str, int]] = {}

    # -- configuration --------------------------------------------------------------------------

    def client_for(self, limits: Limits) -> RedisClient | None:
        if limits.redis_url != self._redis_url:
            if self.redis is not None:
                self.redis.close()
            self.redis = RedisClient(limits.redis_url) if limits.redis_url else None
            self._redis_url = limits.redis_url
            self._sha.clear()
        return self.redis

    def status(self, limits: Limits) -> dict[str, object]:
        if not limits.redis_url:
            return {"status": "ok", "backend": "in-process",
                    "semantics": f"per instance: each of {limits.workers} workers admits "
                                 f"1/{limits.workers} of every limit"}
        broken = self.open_until > time.monotonic() or self.failures > 0
        return {"status": "degraded" if broken else "ok", "backend": "redis",
                "breaker": "open" if self.open_until > time.monotonic() else "closed",
                "policy": limits.redis_failure_policy, "last_error": self.last_error}

    # -- decisions ------------------------------------------------------------------------------

    async def admit(self, limits: Limits, key: KeyRecord, model: str, tokens: int,
                    org: Tier | None, model_limits: Tier | None,
                    nonce: str | None = None, nonce_ttl_ms: int = 0,
                    budgets: list[Budget] | None = None,
                    reservation: Reservation | None = None) -> Ticket:
        client = self.client_for(limits)
        budgets = budgets or []
        if client is None:
            # In-process: this worker enforces its equal share of every limit.
            specs = buckets_for(key, model, tokens, org, model_limits, max(1, limits.workers))
            ticket = Ticket(key, specs, tokens, Verdict(True, None, 0, 0, 0), budgets,
                            reservation)
            ticket.verdict = self._admit_local(limits, ticket, nonce, nonce_ttl_ms)
            return ticket
        specs = buckets_for(key, model, tokens, org, model_limits)
        ticket = Ticket(key, specs, tokens, Verdict(True, None, 0, 0, 0), budgets, reservation)
        started = time.perf_counter()
        ticket.verdict = await self._admit_redis(client, limits, ticket, nonce, nonce_ttl_ms)
        self._decisions += 1
        if not self._decisions & 7:  # a sampled histogram: 1 in 8 decisions
            ADMISSION_LATENCY.observe(time.perf_counter() - started)
        return ticket

    def _admit_local(self, limits: Limits, ticket: Ticket, nonce: str | None,
                     nonce_ttl_ms: int) -> Verdict:
        if nonce is not None:
            # Without Redis, replay protection covers this worker only (documented).
            now = time.monotonic()
            if self._nonces.get(nonce, 0.0) > now:
                raise RouterError("INVALID_REQUEST", "this request's nonce was already used "
                                                     "(a replay)", field="X-Signature-Nonce")
            self._nonces[nonce] = now + nonce_ttl_ms / 1000
            if len(self._nonces) > 4096 and len(self._nonces) % 1024 == 0:
                self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        r = ticket.reservation
        share = max(1, limits.workers)
        if r is not None:
            for b in ticket.budgets:
                local = Budget(b.scope, b.period, *(v if v < 0 else v // share for v in (
                    b.spend_micro, b.tokens, b.requests)))
                dim = refused(local, self.ledger(b), r)
                if dim is not None:
                    ticket.refused_budget = (b, dim)
                    return Verdict(False, None, 0, 0, 0)
        verdict = take_all(ticket.specs, self._local, time.monotonic() * 1000)
        if verdict.allowed and r is not None:
            for b in ticket.budgets:
                self._charge(b, r.spend_micro, r.tokens, r.requests)
        return verdict

    def ledger(self, b: Budget) -> dict[str, int]:
        return self._used.setdefault((b.scope, period_id(b.period)),
                                     {"spend": 0, "tokens": 0, "requests": 0})

    def _charge(self, b: Budget, spend: int, tokens: int, requests: int) -> None:
        used = self.ledger(b)
        used["spend"] += spend
        used["tokens"] += tokens
        used["requests"] += requests

    async def _script(self, client: RedisClient, name: str, source: str,
                      keys: list[str], args: list[str | int | float], timeout: float) -> object:
        sha = self._sha.get(name)
        if sha is None:
            loaded = await client.execute("SCRIPT", "LOAD", source, timeout=timeout)
            if isinstance(loaded, RedisError):
                raise loaded
            sha = self._sha[name] = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        reply = await client.execute("EVALSHA", sha, len(keys), *keys, *args, timeout=timeout)
        if isinstance(reply, RedisError):
            if str(reply).startswith("NOSCRIPT"):
                self._sha.pop(name, None)
                return await self._script(client, name, source, keys, args, timeout)
            raise reply
        return reply

    async def _admit_redis(self, client: RedisClient, limits: Limits, ticket: Ticket,
                           nonce: str | None, nonce_ttl_ms: int) -> Verdict:
        if self.open_until > time.monotonic():
            ticket.charged = False
            return self._on_failure(limits, None)
        key, specs = ticket.key, ticket.specs
        budgets = ticket.budgets if ticket.reservation is not None else []
        now = time.time()
        keys = [redis_key(key, s.name) for s in specs]
        keys += [budget_key(key.org, b, now) for b in budgets]
        if nonce is not None:
            keys.append(f"apirouter:nonce:{{{key.org}}}:{key.key_id}:{nonce}")
        args: list[str | int | float] = [len(specs), nonce_ttl_ms if nonce else 0, len(budgets)]
        for s in specs:
            args += [s.capacity, repr(s.refill_per_ms), s.cost]
        r = ticket.reservation
        for b in budgets:
            assert r is not None
            args += [b.spend_micro, b.tokens, b.requests, r.spend_micro, r.tokens, r.requests,
                     period_ttl_ms(b.period)]
        try:
            reply = await self._script(client, "admit", ADMIT_LUA, keys, args,
                                       limits.redis_timeout_ms / 1000)
        except (RedisUnavailable, RedisError, OSError) as e:
            ticket.charged = False
            return self._on_failure(limits, e)
        self.failures = 0
        self.last_error = None
        if not isinstance(reply, list) or len(reply) != 5:
            ticket.charged = False
            return self._on_failure(limits, RedisUnavailable(f"unexpected reply {reply!r}"))
        code, index, remaining, retry, reset = (int(x) for x in reply)
        if code == 1:
            return Verdict(True, None, int(remaining), 0, int(reset))
        if code == -1:
            raise RouterError("INVALID_REQUEST", "this request's nonce was already used "
                                                 "(a replay)", field="X-Signature-Nonce")
        if code == 2:
            ticket.refused_budget = (budgets[index - 1], _DIMENSIONS[remaining - 1])
            return Verdict(False, None, 0, 0, 0)
        return Verdict(False, specs[int(index) - 1], int(remaining), int(retry), int(reset))

    def _on_failure(self, limits: Limits, error: Exception | None) -> Verdict:
        if error is not None:
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"[:200]
            if self.failures >= BREAKER_FAILURES:
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

    # -- after the response ---------------------------------------------------------------------

    def settle_soon(self, limits: Limits, ticket: Ticket, actual_tokens: int,
                    actual_spend_micro: int | None) -> None:
        """Correct token buckets and budgets from the reservation to what the request really
        used (0 tokens and no spend for a failed request: its reservation is released) — at
        once in-process, in the background with Redis (never delaying the response)."""
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
        if self.client_for(limits) is None:
            now = time.monotonic() * 1000
            share = max(1, limits.workers)
            for s in specs:
                settle(s, self._local, now, delta // share)
            if budget_delta is not None:
                for b in ticket.budgets:
                    self._charge(b, *budget_delta)
            return
        if specs or budget_delta is not None:
            spawn(self._settle_redis(limits, ticket, specs, delta, budget_delta))

    async def _settle_redis(self, limits: Limits, ticket: Ticket, specs: list[BucketSpec],
                            delta: int, budget_delta: tuple[int, int, int] | None) -> None:
        client = self.client_for(limits)
        assert client is not None
        timeout = max(0.05, limits.redis_timeout_ms / 1000)
        if budget_delta is not None:
            for b in ticket.budgets:
                try:
                    await self._script(client, "budget_settle", BUDGET_SETTLE_LUA,
                                       [budget_key(ticket.key.org, b)], list(budget_delta),
                                       timeout)
                except (RedisUnavailable, RedisError, OSError) as e:
                    log.warning("could not settle budget %s: %s", b.scope, e)
        for s in specs:
            try:
                await self._script(client, "settle", SETTLE_LUA, [redis_key(ticket.key, s.name)],
                                   [s.capacity, repr(s.refill_per_ms), delta, BUCKET_TTL_MS],
                                   timeout)
            except (RedisUnavailable, RedisError, OSError) as e:
                log.warning("could not settle %s for key %s: %s", s.name, ticket.key.key_id, e)
                return


def spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Run settlement off the response path; keep a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future[None]] = set()


async def budget_usage(admission: Admission, limits: Limits, budgets: list[Budget],
                       org_of: dict[str, str]) -> list[dict[str, object]]:
    """Spend and remaining per budget for the admin API (the current period)."""
    client = admission.client_for(limits)
    out = []
    for b in budgets:
        if client is None:
            used = dict(admission.ledger(b))
            scope_note = "this worker's share (in-process limiter)"
        else:
            org = org_of.get(b.scope, b.scope.split(":", 1)[1])
            reply = await client.execute("HMGET", budget_key(org, b), *_DIMENSIONS,
                                         timeout=max(0.05, limits.redis_timeout_ms / 1000))
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
