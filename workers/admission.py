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
from dataclasses import dataclass
from typing import Any

from apirouter.errors import RouterError
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketSpec, BucketState, Verdict, buckets_for, settle, take_all
from apirouter.table import Limits
from workers.metrics import ADMISSION_DEGRADED, ADMISSION_LATENCY
from workers.redis_client import RedisClient, RedisError, RedisUnavailable

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
  local b = 2 + (i - 1) * 3
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
local nonce_ttl = tonumber(ARGV[2])
if nonce_ttl > 0 then
  if not redis.call('SET', KEYS[n + 1], '1', 'NX', 'PX', nonce_ttl) then
    return {-1, 0, 0, 0, 0}
  end
end
local first_left, first_reset = 0, 0
for i = 1, n do
  local b = 2 + (i - 1) * 3
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


def redis_key(key: KeyRecord, bucket: str) -> str:
    # The {org} hash tag keeps all buckets of one request in one Redis Cluster slot.
    return f"apirouter:rl:{{{key.org}}}:{bucket}"


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

    # -- configuration --------------------------------------------------------------------------

    def _client(self, limits: Limits) -> RedisClient | None:
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
                    nonce: str | None = None, nonce_ttl_ms: int = 0) -> Ticket:
        client = self._client(limits)
        if client is None:
            # In-process: this worker enforces its equal share of every limit.
            specs = buckets_for(key, model, tokens, org, model_limits, max(1, limits.workers))
            return Ticket(key, specs, tokens,
                          self._admit_local(specs, nonce, nonce_ttl_ms))
        specs = buckets_for(key, model, tokens, org, model_limits)
        started = time.perf_counter()
        verdict = await self._admit_redis(client, limits, key, specs, nonce, nonce_ttl_ms)
        self._decisions += 1
        if not self._decisions & 7:  # a sampled histogram: 1 in 8 decisions
            ADMISSION_LATENCY.observe(time.perf_counter() - started)
        return Ticket(key, specs, tokens, verdict)

    def _admit_local(self, specs: list[BucketSpec], nonce: str | None,
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
        return take_all(specs, self._local, time.monotonic() * 1000)

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

    async def _admit_redis(self, client: RedisClient, limits: Limits, key: KeyRecord,
                           specs: list[BucketSpec], nonce: str | None,
                           nonce_ttl_ms: int) -> Verdict:
        if self.open_until > time.monotonic():
            return self._on_failure(limits, None)
        keys = [redis_key(key, s.name) for s in specs]
        if nonce is not None:
            keys.append(f"apirouter:nonce:{{{key.org}}}:{key.key_id}:{nonce}")
        args: list[str | int | float] = [len(specs), nonce_ttl_ms if nonce else 0]
        for s in specs:
            args += [s.capacity, repr(s.refill_per_ms), s.cost]
        try:
            reply = await self._script(client, "admit", ADMIT_LUA, keys, args,
                                       limits.redis_timeout_ms / 1000)
        except (RedisUnavailable, RedisError, OSError) as e:
            return self._on_failure(limits, e)
        self.failures = 0
        self.last_error = None
        if not isinstance(reply, list) or len(reply) != 5:
            return self._on_failure(limits, RedisUnavailable(f"unexpected reply {reply!r}"))
        code, index, remaining, retry, reset = (int(x) for x in reply)
        if code == 1:
            return Verdict(True, None, int(remaining), 0, int(reset))
        if code == -1:
            raise RouterError("INVALID_REQUEST", "this request's nonce was already used "
                                                 "(a replay)", field="X-Signature-Nonce")
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

    def settle_soon(self, limits: Limits, ticket: Ticket, actual_tokens: int) -> None:
        """Correct every token bucket from the estimate to what the request really used:
        at once in-process, in the background with Redis (never delaying the response)."""
        delta = actual_tokens - ticket.reserved_tokens
        specs = [s for s in ticket.specs if s.name.endswith(":tpm")]
        if not delta or not specs or not ticket.verdict.allowed:
            return
        if self._client(limits) is None:
            now = time.monotonic() * 1000
            share = max(1, limits.workers)
            for s in specs:
                settle(s, self._local, now, delta // share)
            return
        spawn(self._settle_redis(limits, ticket, specs, delta))

    async def _settle_redis(self, limits: Limits, ticket: Ticket, specs: list[BucketSpec],
                            delta: int) -> None:
        client = self._client(limits)
        assert client is not None
        for s in specs:
            try:
                await self._script(client, "settle", SETTLE_LUA, [redis_key(ticket.key, s.name)],
                                   [s.capacity, repr(s.refill_per_ms), delta, BUCKET_TTL_MS],
                                   max(0.05, limits.redis_timeout_ms / 1000))
            except (RedisUnavailable, RedisError, OSError) as e:
                log.warning("could not settle %s for key %s: %s", s.name, ticket.key.key_id, e)
                return


def spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Run settlement off the response path; keep a reference until it is done."""
    task = asyncio.ensure_future(coro)
    _pending.add(task)
    task.add_done_callback(_pending.discard)


_pending: set[asyncio.Future[None]] = set()
