"""The Redis side of admission: Lua scripts and the keys and arguments they take.

Every admission carries a reservation id. The admission script records it (``a``) when it
charges; a release — sent for an admission whose answer never arrived (the failure policy
decided) — turns the record into a tombstone (``r``) and refunds the charge only if the record
said ``a``. The admission script charges nothing when it finds the tombstone already there, so
whichever of the two Redis runs first, a reservation released is never charged, and a release
is harmless for a reservation Redis never saw and when repeated.

Argument layout of ADMIT and RELEASE (n buckets, m budgets)::

    ARGV  1 n   2 nonce ttl ms (0: none)   3 m   4 reservation-record ttl ms
          then per bucket: capacity, refill per ms, cost
          then per budget: limit spend, tokens, requests; reserve spend, tokens, requests;
                           the budget key's ttl ms
    KEYS  n bucket keys, m budget keys, the reservation record, [the nonce]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apirouter.budgets import Budget, Reservation, period_ttl_ms
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketPlan, BucketSpec
from apirouter.redis_client import bulk_int, bulk_str

BUCKET_TTL_MS = 180_000  # idle buckets are full again by then: let Redis forget them
RESERVATION_TTL_MS = 120_000  # how long Redis remembers an admission for a late release
TOMBSTONE_TTL_MS = 3_600_000  # how long a release blocks its admission from running late

_LEVEL = """
local function level(key, cap, rate, now)
  local s = redis.call('HMGET', key, 't', 'ts')
  if s[1] then
    return math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
  end
  return cap
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A bucket's level now, read-only (the rate-limit gauges of workers.scrape_metrics).
LEVEL_LUA = _LEVEL + """
return tostring(level(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now))
"""

ADMIT_LUA = _LEVEL + """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[3])
local rk = KEYS[n + m + 1]
if redis.call('EXISTS', rk) == 1 then
  return {3, 0, 0, 0, 0}
end
local levels = {}
for i = 1, n do
  local b = 4 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tokens = level(KEYS[i], cap, rate, now)
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
local bb = 4 + n * 3
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
  if not redis.call('SET', KEYS[n + m + 2], '1', 'NX', 'PX', nonce_ttl) then
    return {-1, 0, 0, 0, 0}
  end
end
redis.call('SET', rk, 'a', 'PX', ARGV[4])
for j = 1, m do
  local a = bb + (j - 1) * 7
  redis.call('HINCRBY', KEYS[n + j], 'spend', ARGV[a + 4])
  redis.call('HINCRBY', KEYS[n + j], 'tokens', ARGV[a + 5])
  redis.call('HINCRBY', KEYS[n + j], 'requests', ARGV[a + 6])
  redis.call('PEXPIRE', KEYS[n + j], ARGV[a + 7])
end
local first_left, first_reset = 0, 0
for i = 1, n do
  local b = 4 + (i - 1) * 3
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

RELEASE_LUA = _LEVEL + """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[3])
local old = redis.call('SET', KEYS[n + m + 1], 'r', 'PX', %(tomb)d, 'GET')
if old ~= 'a' then
  return 0
end
for i = 1, n do
  local b = 4 + (i - 1) * 3
  local cap, rate, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local tokens = math.min(cap, level(KEYS[i], cap, rate, now) + cost)
  redis.call('HSET', KEYS[i], 't', string.format('%.6f', tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], %(ttl)d)
end
local bb = 4 + n * 3
for j = 1, m do
  local a = bb + (j - 1) * 7
  redis.call('HINCRBY', KEYS[n + j], 'spend', 0 - tonumber(ARGV[a + 4]))
  redis.call('HINCRBY', KEYS[n + j], 'tokens', 0 - tonumber(ARGV[a + 5]))
  redis.call('HINCRBY', KEYS[n + j], 'requests', 0 - tonumber(ARGV[a + 6]))
end
return 1
""".replace("%(ttl)d", str(BUCKET_TTL_MS)).replace("%(tomb)d", str(TOMBSTONE_TTL_MS))

BUDGET_SETTLE_LUA = """
redis.call('HINCRBY', KEYS[1], 'spend', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[3])
return 1
"""

# One bucket's settlement: the reference SETTLE_MANY_LUA is held to (tests), and what it does
# for each of its keys.
SETTLE_LUA = _LEVEL + """
local cap, rate, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = math.min(cap, level(KEYS[1], cap, rate, now) - delta)
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# The token-bucket settlements of one event-loop turn (one org: its keys share a cluster slot)
# in one call, applied in order as that many SETTLE calls would be, at one ``now``.
#     ARGV 1 the bucket keys' ttl ms, then per key: capacity, refill per ms, delta
SETTLE_MANY_LUA = _LEVEL + """
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 3
  local cap, rate, delta = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local tokens = math.min(cap, level(KEYS[i], cap, rate, now) - delta)
  redis.call('HSET', KEYS[i], 't', string.format('%.6f', tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return #KEYS
"""
SETTLE_MANY_MAX = 128  # buckets a call: a script blocks Redis while it runs


def bucket_key(org: str, bucket: str) -> str:
    # The {org} hash tag keeps all keys of one request in one Redis Cluster slot.
    return f"apirouter:rl:{{{org}}}:{bucket}"


def budget_key(org: str, scope: str, period: str) -> str:
    """``period`` is the period id (2026-11-29, 2026-11) the reservation was made in."""
    return f"apirouter:budget:{{{org}}}:{scope}:{period}"


def reservation_key(org: str, rid: str) -> str:
    return f"apirouter:res:{{{org}}}:{rid}"


def nonce_key(org: str, key_id: str, nonce: str) -> str:
    return f"apirouter:nonce:{{{org}}}:{key_id}:{nonce}"


# -- the admission command, from kept fragments ---------------------------------------------------

_EVALSHA = bulk_str("EVALSHA")
_ZERO = bulk_int(0)
_RES_TTL = bulk_int(RESERVATION_TTL_MS)
_BUCKET_TTL = bulk_int(BUCKET_TTL_MS)


@dataclass(slots=True)
class _Fragments:
    """What ADMIT's EVALSHA holds for one key, org and model (and bucket count) while the same
    tiers are in force: everything but the reservation id, the costs and any budget or nonce."""

    tiers: tuple[Tier, Tier | None, Tier | None]
    sha: str
    head: bytes  # "*count", EVALSHA, sha, KEYS count, bucket keys: no budget, no nonce
    evalsha: bytes  # EVALSHA, sha
    bucket_keys: bytes
    args_head: bytes  # n, nonce ttl 0, m 0, reservation ttl: no budget, no nonce
    n: bytes
    per_bucket: tuple[bytes, ...]  # capacity, refill per ms (the cost follows each)
    res_prefix: str


class ScriptCommands:
    """ADMIT's EVALSHA as RESP bytes, identical to ``encode_command("EVALSHA", sha, len(keys),
    *keys, *args)`` over the layout above, built from fragments kept per key, org, model and
    bucket count (valid while the same tier objects are in force: a table reload makes new
    ones) so that only the per-request values — reservation id, costs, budgets, nonce — are
    encoded per request. Argument by argument (even with kept argument encodings) it cost
    ~2 µs a request."""

    MAX_PLANS = 65536

    def __init__(self) -> None:
        self._plans: dict[tuple[str, str, str, int], _Fragments] = {}
        # (org, bucket) -> (capacity, per minute, key, capacity and refill per ms)
        self._buckets: dict[tuple[str, str], tuple[int, int, bytes, bytes]] = {}

    def bucket(self, org: str, s: BucketSpec) -> tuple[bytes, bytes]:
        """A token bucket's key, and its capacity and refill per ms, as SETTLE_MANY takes
        them (kept per org and bucket while its limits stay the same)."""
        k = self._buckets.get((org, s.name))
        if k is None or k[0] != s.capacity or k[1] != s.per_minute:
            if len(self._buckets) >= self.MAX_PLANS:
                self._buckets.clear()
            k = self._buckets[(org, s.name)] = (
                s.capacity, s.per_minute, bulk_str(bucket_key(org, s.name)),
                bulk_int(s.capacity) + bulk_str(repr(s.refill_per_ms)))
        return k[2], k[3]

    @staticmethod
    def settle_many(sha: str, keys: list[bytes], args: list[bytes]) -> bytes:
        """SETTLE_MANY's EVALSHA over ``keys`` (``bucket``'s) and, per key, ``bucket``'s
        capacity and refill followed by the delta's bulk string."""
        return b"".join((b"*%d\r\n" % (4 + 4 * len(keys)), _EVALSHA, bulk_str(sha),
                         bulk_int(len(keys)), *keys, _BUCKET_TTL, *args))

    def _fragments(self, sha: str, key: KeyRecord, model: str, org: Tier | None,
                   model_limits: Tier | None, specs: list[BucketSpec]) -> _Fragments:
        n = len(specs)
        f = self._plans.get((key.key_id, key.org, model, n))
        if f is not None and f.tiers[0] is key.limits and f.tiers[1] is org and \
                f.tiers[2] is model_limits and f.sha is sha:
            return f
        evalsha = _EVALSHA + bulk_str(sha)
        keys = b"".join(bulk_str(bucket_key(key.org, s.name)) for s in specs)
        per_bucket = tuple(bulk_int(s.capacity) + bulk_str(repr(s.refill_per_ms))
                           for s in specs)
        f = _Fragments((key.limits, org, model_limits), sha,
                       b"*%d\r\n" % (8 + 4 * n) + evalsha + bulk_int(n + 1) + keys,
                       evalsha, keys, bulk_int(n) + _ZERO + _ZERO + _RES_TTL, bulk_int(n),
                       per_bucket, reservation_key(key.org, ""))
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
        self._plans[(key.key_id, key.org, model, n)] = f
        return f

    def command(self, sha: str, key: KeyRecord, model: str, org: Tier | None,
                model_limits: Tier | None, specs: list[BucketSpec], rid: str,
                nonce: str | None, nonce_ttl_ms: int, budgets: Sequence[Budget],
                periods: Sequence[str], r: Reservation | None) -> bytes:
        """``specs``: buckets_for(key, model, tokens, org, model_limits); budgets are sent only
        with a reservation (as _script_args does)."""
        f = self._fragments(sha, key, model, org, model_limits, specs)
        res = bulk_str(f.res_prefix + rid)
        if r is None or not budgets:
            if nonce is None:
                out = [f.head, res, f.args_head]
            else:
                n = len(specs)
                out = [b"*%d\r\n" % (9 + 4 * n), f.evalsha, bulk_int(n + 2), f.bucket_keys, res,
                       bulk_str(nonce_key(key.org, key.key_id, nonce)), f.n,
                       bulk_int(nonce_ttl_ms if nonce else 0), _ZERO, _RES_TTL]
            for fixed, s in zip(f.per_bucket, specs, strict=True):
                out += (fixed, bulk_int(s.cost))
            return b"".join(out)
        n, m = len(specs), len(budgets)
        out = [b"*%d\r\n" % (8 + 4 * n + 8 * m + (nonce is not None)), f.evalsha,
               bulk_int(n + m + 1 + (nonce is not None)), f.bucket_keys]
        out += [bulk_str(budget_key(key.org, b.scope, p))
                for b, p in zip(budgets, periods, strict=True)]
        out.append(res)
        if nonce is not None:
            out.append(bulk_str(nonce_key(key.org, key.key_id, nonce)))
        out += (f.n, bulk_int(nonce_ttl_ms if nonce else 0), bulk_int(m), _RES_TTL)
        for fixed, s in zip(f.per_bucket, specs, strict=True):
            out += (fixed, bulk_int(s.cost))
        for b in budgets:
            out += (bulk_int(b.spend_micro), bulk_int(b.tokens), bulk_int(b.requests),
                    bulk_int(r.spend_micro), bulk_int(r.tokens), bulk_int(r.requests),
                    bulk_int(period_ttl_ms(b.period)))
        return b"".join(out)


# -- the admission command of a plan, as one template ---------------------------------------------

class PlannedAdmit:
    """ADMIT's EVALSHA for one BucketPlan (a key, org and model under its tiers) with no
    budget and no nonce — the common admission — as one bytes template that only the
    reservation id and the request's token count are spliced into (``command``: one bytes
    formatting); and the settlement's fragments of the plan's token-buckets (the key, and
    the capacity and refill, as ScriptCommands.bucket makes them). Kept on the plan
    (BucketPlan.redis) by ``planned_admit``. Made from kept fragments (ScriptCommands.command)
    the command cost ~300 bytecodes a request (buckets_for's specs, a fragment lookup, an
    encoding per cost)."""

    __slots__ = ("sha", "template", "res_len", "token_buckets", "org", "settle_keys",
                 "settle_fixed")

    def __init__(self, plan: BucketPlan, org: str, sha: str) -> None:
        self.sha = sha
        self.org = org
        steps = plan.steps
        n = len(steps)
        res_prefix = reservation_key(org, "").encode()
        self.res_len = len(res_prefix)
        keys = [bulk_str(bucket_key(org, name)) for _, name, _, _ in steps]
        fixed = [bulk_int(capacity) + bulk_str(repr(per_minute / 60_000.0))
                 for _, _, capacity, per_minute in steps]
        parts = [b"*%d\r\n" % (8 + 4 * n), _EVALSHA, bulk_str(sha), bulk_int(n + 1), *keys]
        template = [_escaped(b"".join(parts)), b"$%d\r\n", _escaped(res_prefix), b"%s\r\n",
                    bulk_int(n) + _ZERO + _ZERO + _RES_TTL]
        for (spec, _, _, _), f in zip(steps, fixed, strict=True):
            template += (_escaped(f), b"%s" if spec is None else _escaped(bulk_int(spec.cost)))
        self.template = b"".join(template)
        self.token_buckets = sum(spec is None for spec, _, _, _ in steps)
        self.settle_keys = tuple(k for (spec, _, _, _), k in zip(steps, keys, strict=True)
                                 if spec is None)
        self.settle_fixed = tuple(f for (spec, _, _, _), f in zip(steps, fixed, strict=True)
                                  if spec is None)

    def command(self, rid: str, tokens: int) -> bytes:
        """The command of a request of ``tokens`` (> 0) with reservation id ``rid``: as
        ScriptCommands.command(sha, ..., plan.specs(tokens), rid, None, 0, (), (), None)."""
        cost = bulk_int(tokens)
        res = rid.encode()
        return self.template % (self.res_len + len(res), res, *(cost,) * self.token_buckets)


def planned_admit(plan: BucketPlan, org: str, sha: str) -> PlannedAdmit:
    """The plan's PlannedAdmit (``org``: its key's), kept on it while the script is ``sha``."""
    p: PlannedAdmit | None = plan.redis
    if p is None or p.sha != sha:
        p = plan.redis = PlannedAdmit(plan, org, sha)
    return p


def _escaped(b: bytes) -> bytes:
    """``b`` as literal text of a bytes % template."""
    return b.replace(b"%", b"%%")
