"""The Redis side of admission: Lua scripts and the keys and arguments they take.

Token buckets live one hash per scope (``key:{id}``, ``org:{org}``, ``key:{id}:model:{m}``:
a bucket's name up to its last ``:``), its rpm and tpm buckets fields of it: ``rpm``/``tpm``
the level, ``rpm_ts``/``tpm_ts`` when (ms, Redis's clock) it was, ``ttl_set`` when the key's
expiry was last set. A request of a key's two buckets reads one hash and writes it once. A
redis.call in a script costs Redis ~3-4 µs (7.0, this VM; most of it the call's own machinery,
not the command): a bucket a key of its own was a read, a write and a PEXPIRE each, per
admission and per settlement.

The hashes' prefix (``apirouter:rlh:``) is not the per-bucket keys' of earlier versions
(``apirouter:rl:``): routers of both versions sharing a Redis keep separate buckets (each
enforcing every limit on its own) until all run this one — upgrade them together, or accept
that a limit may admit up to twice over for the minutes of a rolling upgrade. Budgets,
reservations and nonces keep their keys.

A hash's expiry is set by the first write ``BUCKET_TTL_REFRESH_MS`` or more after it was last
set (or when ``ttl_set`` is missing or ahead of the clock), to ``BUCKET_TTL_MS +
BUCKET_TTL_REFRESH_MS``: so a hash still lives at least ``BUCKET_TTL_MS`` past its last write,
with one PEXPIRE a minute, not one each write.

Every admission carries a reservation id. The admission script records it (``a``, SET NX: the
record is made first, and deleted again by a refusal) when it charges; a release — sent for an
admission whose answer never arrived (the failure policy decided) — turns the record into a
tombstone (``r``) and refunds the charge only if the record said ``a``. The admission script
charges nothing when it finds the tombstone already there, so whichever of the two Redis runs
first, a reservation released is never charged, and a release is harmless for a reservation
Redis never saw and when repeated.

Argument layout of ADMIT and RELEASE (h bucket hashes, n buckets, m budgets)::

    ARGV  1 h   2 n   3 m   4 nonce ttl ms (0: none)
          then per bucket: its hash's index (1..h), 1 (rpm) or 3 (tpm), capacity, per minute,
                           cost
          then per budget: limit spend, tokens, requests; reserve spend, tokens, requests;
                           the budget key's ttl ms
    KEYS  h bucket hashes, m budget keys, the reservation record, [the nonce]

Rates go as tokens per minute (integers, divided by 60000 in the script: the same double as
BucketSpec.refill_per_ms), not as the 17-digit decimal of the rate per ms: Lua's tonumber is
strtod, whose long-decimal path was ~4% of Redis's CPU an admission.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apirouter.budgets import Budget, Reservation, period_ttl_ms
from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketPlan, BucketSpec
from apirouter.redis_client import SMALL_BULK_INTS, bulk_int, bulk_str

BUCKET_TTL_MS = 180_000  # idle buckets are full again by then: let Redis forget them
BUCKET_TTL_REFRESH_MS = 60_000  # a bucket hash's expiry is set again this long after
RESERVATION_TTL_MS = 120_000  # how long Redis remembers an admission for a late release
TOMBSTONE_TTL_MS = 3_600_000  # how long a release blocks its admission from running late

# A bucket's fields in its scope's hash: (level, its time), by the limit that ends its name;
# the scripts take a bucket's place as the index of its level in HMGET(_FIELDS).
_LIMIT_FIELDS = {"rpm": ("rpm", "rpm_ts"), "tpm": ("tpm", "tpm_ts")}
_OFFSET = {"rpm": 1, "tpm": 3}

# ``now``; ``state(key)``: a bucket hash's fields (rpm, rpm_ts, tpm, tpm_ts, ttl_set);
# ``level(s, o, cap, rate)``: the level now of the bucket at offset o of state s;
# ``store(key, s, w)``: write the fields of list w to the hash whose state is s, setting its
# expiry when it is due (see the module's docstring).
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local snow = tostring(now)
local function state(key)
  return redis.call('HMGET', key, 'rpm', 'rpm_ts', 'tpm', 'tpm_ts', 'ttl_set')
end
local function level(s, o, cap, rate)
  if s[o] then
    return math.min(cap, tonumber(s[o]) + math.max(0, now - tonumber(s[o + 1])) * rate)
  end
  return cap
end
local function store(key, s, w)
  local e = tonumber(s[5])
  if e and e <= now and now - e < REFRESH then
    redis.call('HSET', key, unpack(w))
  else
    w[#w + 1] = 'ttl_set'
    w[#w + 1] = snow
    redis.call('HSET', key, unpack(w))
    redis.call('PEXPIRE', key, 'EXPIRY')
  end
end
local names = {'rpm', 'rpm_ts', 'tpm', 'tpm_ts'}
-- bucket i's arguments (ADMIT, RELEASE; ADMIT_MANY's from an admission's ``base``): its
-- hash's index, its place in it, capacity, rate per ms, cost
local function bucket(i, base)
  local b = (base or 4) + (i - 1) * 5
  return tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
         tonumber(ARGV[b + 4]) / 60000, tonumber(ARGV[b + 5])
end
""".replace("REFRESH", str(BUCKET_TTL_REFRESH_MS)).replace(
    "EXPIRY", str(BUCKET_TTL_MS + BUCKET_TTL_REFRESH_MS))

# An admission's bucket charged, its buckets' writes and its admitted reply (ADMIT and
# ADMIT_MANY, one text for both: the property test holds ADMIT_MANY to ADMIT).
# ``charge(i, s, o, cap, rate, cost)``: bucket i's tokens left once charged ``cost`` on the
# level at offset o of state s, or nil and the refusal's reply (tokens, retry after and full
# again in ms); ``charge_all(n, base, states)``: an admission's n buckets (their arguments
# from ARGV ``base``: bucket's) charged on the states of their hashes (by index), into
# ``left``, ``ks``, ``offsets`` (by bucket) and ``cap1``, ``rate1`` (the first's), or the
# first refusal's reply; ``admitted(n, left1, cap1, rate1)``: the reply of an admission of n
# buckets, the first left with left1.
_CHARGE = """
local function charge(i, s, o, cap, rate, cost)
  local tokens = level(s, o, cap, rate)
  if tokens < cost then
    local retry, reset = 60000, 0
    if rate > 0 then
      retry = math.ceil((cost - tokens) / rate)
      reset = math.ceil((cap - tokens) / rate)
    end
    return nil, {0, i, math.floor(math.max(0, tokens)), retry, reset}
  end
  return tokens - cost
end
local left, ks, offsets = {}, {}, {}
local cap1, rate1
local function charge_all(n, base, states)
  for i = 1, n do
    local k, o, cap, rate, cost = bucket(i, base)
    local rest, refusal = charge(i, states[k], o, cap, rate, cost)
    if not rest then
      return refusal
    end
    left[i], ks[i], offsets[i] = rest, k, o
    if i == 1 then
      cap1, rate1 = cap, rate
    end
  end
end
-- the fields an admission's charged buckets write, by their hash's index: each bucket's level
-- and its time, named by ``field`` (a bucket's place in the hash -> what the writer takes)
local function bucket_writes(n, ks, offsets, left, field)
  local writes = {}
  for i = 1, n do
    local k, o = ks[i], offsets[i]
    local w = writes[k]
    if not w then
      w = {}
      writes[k] = w
    end
    local j = #w
    w[j + 1], w[j + 2], w[j + 3], w[j + 4] = field[o], string.format('%.6f', left[i]),
                                             field[o + 1], snow
  end
  return writes
end
local function admitted(n, left1, cap1, rate1)
  if n == 0 then
    return {1, 0, 0, 0, 0}
  end
  local first_reset = 0
  if rate1 > 0 then
    first_reset = math.ceil((cap1 - left1) / rate1)
  end
  return {1, 0, math.floor(math.max(0, left1)), 0, first_reset}
end
"""

# A bucket's level now, read-only (the rate-limit gauges of workers.scrape_metrics).
#     KEYS 1 the bucket's hash; ARGV its limit (rpm, tpm), capacity, refill per ms (the hash
#     and the limit: level_address)
LEVEL_LUA = _PRELUDE + """
local limit = ARGV[1]
local s = redis.call('HMGET', KEYS[1], limit, limit .. '_ts')
return tostring(level(s, 1, tonumber(ARGV[2]), tonumber(ARGV[3])))
"""

ADMIT_LUA = _PRELUDE + _CHARGE + """
local h, n, m = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rk = KEYS[h + m + 1]
if not redis.call('SET', rk, 'a', 'NX', 'PX', 'RESTTL') then
  return {3, 0, 0, 0, 0}
end
-- The checks run under pcall: the record above is made first and Redis does not roll a
-- script back, so a check that raises (a key of another type: foreign or corrupted data)
-- must take the record away again, or a release would refund a charge never made.
local states = {}
local bb = 4 + n * 5
local ok, refused = pcall(function()
  for k = 1, h do
    states[k] = state(KEYS[k])
  end
  local refusal = charge_all(n, 4, states)
  if refusal then
    return refusal
  end
  for j = 1, m do
    local a = bb + (j - 1) * 7
    local used = redis.call('HMGET', KEYS[h + j], 'spend', 'tokens', 'requests')
    for d = 1, 3 do
      local limit, need = tonumber(ARGV[a + d]), tonumber(ARGV[a + 3 + d])
      if limit >= 0 and (tonumber(used[d]) or 0) + need > limit then
        return {2, j, d, 0, 0}
      end
    end
  end
  local nonce_ttl = tonumber(ARGV[4])
  if nonce_ttl > 0 then
    if not redis.call('SET', KEYS[h + m + 2], '1', 'NX', 'PX', nonce_ttl) then
      return {-1, 0, 0, 0, 0}
    end
  end
end)
if not ok or refused then
  redis.call('DEL', rk)
  if not ok then  -- redis.call raises a table {err = ...}; Lua itself a string
    return redis.error_reply(type(refused) == 'table' and refused.err or tostring(refused))
  end
  return refused
end
for j = 1, m do
  local a = bb + (j - 1) * 7
  redis.call('HINCRBY', KEYS[h + j], 'spend', ARGV[a + 4])
  redis.call('HINCRBY', KEYS[h + j], 'tokens', ARGV[a + 5])
  redis.call('HINCRBY', KEYS[h + j], 'requests', ARGV[a + 6])
  redis.call('PEXPIRE', KEYS[h + j], ARGV[a + 7])
end
local writes = bucket_writes(n, ks, offsets, left, names)
for k = 1, h do
  if writes[k] then
    store(KEYS[k], states[k], writes[k])
  end
end
return admitted(n, left[1], cap1, rate1)
""".replace("RESTTL", str(RESERVATION_TTL_MS))

# The admissions of one event-loop turn of one org (its keys share a cluster slot; at most
# ADMIT_MANY_MAX) in one call, applied in order as that many ADMIT calls (no budget, no nonce)
# would be, at one ``now``: each admission's reservation record made (SET NX) and, refused or
# failed, deleted again, as ADMIT does; each bucket hash read once and written once (one HSET of
# the fields the admissions wrote, their last values; its expiry set when any of them would
# have), the level carried from one admission to the next as the hash would hold it (formatted:
# as the next ADMIT would read it). A hash that cannot be read (a key of another type) fails
# each admission that reads it with ADMIT's error, as its own reply; a level ADMIT cannot
# compute (a field that is not a number) fails that admission with the same Lua error (raised
# in the prelude's ``level``, at the same line). Reservation records and bucket hashes are
# different keys (their prefixes): a hash's write waits for the end of the call. So a record
# says "charged" (``a``) before its charge is written: nothing between the two may raise out
# of the script (every check runs under pcall; the final HSET/PEXPIRE are of hashes this call
# has read), or the releases of those admissions would refund charges never made.
#     KEYS per admission: its h bucket hashes, its reservation record (ADMIT's KEYS)
#     ARGV 1 the count, then per admission: h, n, and per bucket ADMIT's five (its hash's
#          index among its own h, place, capacity, per minute, cost)
# Reply: per admission, ADMIT's reply (an error reply in its place).
ADMIT_MANY_LUA = _PRELUDE + _CHARGE + """
local states, failed, order, written, seen, expire = {}, {}, {}, {}, {}, {}
local fields = {'rpm', 'rpm_ts', 'tpm', 'tpm_ts', 'ttl_set'}
local places = {1, 2, 3, 4}  -- (bucket_writes: ADMIT_MANY keeps a hash's fields by place)
-- a bucket hash's fields as this call has left them (read once; its failure kept)
local function hash(key)
  local s = states[key]
  if s then
    return s
  end
  local e = failed[key]
  if e == nil then
    local ok, r = pcall(state, key)
    if ok then
      states[key] = r
      return r
    end
    e = r
    failed[key] = e
  end
  error(e, 0)
end
-- store's write, into the state kept (the fields in the order first written)
local function put(key, s, w)
  local e = tonumber(s[5])
  if not (e and e <= now and now - e < REFRESH) then
    w[#w + 1] = 5
    w[#w + 1] = snow
    expire[key] = true
  end
  local f = written[key]
  if not f then
    f = {}
    written[key] = f
    seen[key] = {}
    order[#order + 1] = key
  end
  local has = seen[key]
  for j = 1, #w, 2 do
    local i = w[j]
    if not has[i] then
      has[i] = true
      f[#f + 1] = i
    end
    s[i] = w[j + 1]
  end
end
-- ADMIT's checks of the admission whose KEYS follow kp and ARGV ap
local function check(kp, ap, h, n)
  local own = {}  -- its hashes' states, by their index among its h
  for k = 1, h do
    own[k] = hash(KEYS[kp + k])
  end
  return charge_all(n, ap + 2, own)
end
local replies = {}
local kp, ap = 0, 1
for a = 1, tonumber(ARGV[1]) do
  local h, n = tonumber(ARGV[ap + 1]), tonumber(ARGV[ap + 2])
  local rk = KEYS[kp + h + 1]
  if not redis.call('SET', rk, 'a', 'NX', 'PX', 'RESTTL') then
    replies[a] = {3, 0, 0, 0, 0}
  else
    local ok, refused = pcall(check, kp, ap, h, n)
    if not ok or refused then
      redis.call('DEL', rk)
      if not ok then
        refused = redis.error_reply(type(refused) == 'table' and refused.err or
                                    tostring(refused))
      end
      replies[a] = refused
    else
      local writes = bucket_writes(n, ks, offsets, left, places)
      for k = 1, h do
        if writes[k] then
          local key = KEYS[kp + k]
          put(key, states[key], writes[k])
        end
      end
      replies[a] = admitted(n, left[1], cap1, rate1)
    end
  end
  kp = kp + h + 1
  ap = ap + 2 + 5 * n
end
for _, key in ipairs(order) do
  local s, f, w = states[key], written[key], {}
  for j = 1, #f do
    w[#w + 1] = fields[f[j]]
    w[#w + 1] = s[f[j]]
  end
  redis.call('HSET', key, unpack(w))
  if expire[key] then
    redis.call('PEXPIRE', key, 'EXPIRY')
  end
end
return replies
""".replace("RESTTL", str(RESERVATION_TTL_MS)).replace(
    "REFRESH", str(BUCKET_TTL_REFRESH_MS)).replace(
    "EXPIRY", str(BUCKET_TTL_MS + BUCKET_TTL_REFRESH_MS))
ADMIT_MANY_MAX = 64  # admissions a call: a script blocks Redis while it runs

RELEASE_LUA = _PRELUDE + """
local h, n, m = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local old = redis.call('SET', KEYS[h + m + 1], 'r', 'PX', 'TOMB', 'GET')
if old ~= 'a' then
  return 0
end
local states, writes = {}, {}
for k = 1, h do
  states[k] = state(KEYS[k])
  writes[k] = {}
end
for i = 1, n do
  local k, o, cap, rate, cost = bucket(i)
  local w = writes[k]
  w[#w + 1] = names[o]
  w[#w + 1] = string.format('%.6f', math.min(cap, level(states[k], o, cap, rate) + cost))
  w[#w + 1] = names[o + 1]
  w[#w + 1] = snow
end
for k = 1, h do
  if #writes[k] > 0 then
    store(KEYS[k], states[k], writes[k])
  end
end
local bb = 4 + n * 5
for j = 1, m do
  local a = bb + (j - 1) * 7
  redis.call('HINCRBY', KEYS[h + j], 'spend', 0 - tonumber(ARGV[a + 4]))
  redis.call('HINCRBY', KEYS[h + j], 'tokens', 0 - tonumber(ARGV[a + 5]))
  redis.call('HINCRBY', KEYS[h + j], 'requests', 0 - tonumber(ARGV[a + 6]))
end
return 1
""".replace("TOMB", str(TOMBSTONE_TTL_MS))

BUDGET_SETTLE_LUA = """
redis.call('HINCRBY', KEYS[1], 'spend', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'requests', ARGV[3])
return 1
"""

# One token bucket's settlement (its tpm fields): the reference SETTLE_MANY_LUA is held to
# (tests), and what it does for each of its keys.
#     KEYS 1 the bucket's hash; ARGV capacity, per minute, delta, (unused: the ttl ms)
SETTLE_LUA = _PRELUDE + """
local cap, rate, delta = tonumber(ARGV[1]), tonumber(ARGV[2]) / 60000, tonumber(ARGV[3])
local s = state(KEYS[1])
local tokens = string.format('%.6f', math.min(cap, level(s, 3, cap, rate) - delta))
store(KEYS[1], s, {'tpm', tokens, 'tpm_ts', snow})
return 1
"""

# The token-bucket settlements of one event-loop turn (one org: its keys share a cluster slot)
# in one call, applied in order as that many SETTLE calls would be, at one ``now``: each hash
# read once and written once (a turn's requests of one key settle the same bucket: at c=32,
# one read and one write instead of one each a request), the level carried from one to the
# next as the hash would hold it (formatted: as the next SETTLE would read it).
#     ARGV 1 (unused: the ttl ms), then per key: capacity, per minute, delta
SETTLE_MANY_LUA = _PRELUDE + """
local states, levels, order = {}, {}, {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local j = 2 + (i - 1) * 3
  local cap, rate, delta = tonumber(ARGV[j]), tonumber(ARGV[j + 1]) / 60000,
                           tonumber(ARGV[j + 2])
  local tokens = levels[key]
  if tokens == nil then
    local s = state(key)
    states[key] = s
    order[#order + 1] = key
    tokens = level(s, 3, cap, rate)
  else
    tokens = math.min(cap, tonumber(tokens))
  end
  levels[key] = string.format('%.6f', math.min(cap, tokens - delta))
end
for _, key in ipairs(order) do
  store(key, states[key], {'tpm', levels[key], 'tpm_ts', snow})
end
return #KEYS
"""
SETTLE_MANY_MAX = 128  # buckets a call: a script blocks Redis while it runs


def scope_key(org: str, scope: str) -> str:
    """The hash of a scope's token buckets. The {org} hash tag keeps all keys of one request
    in one Redis Cluster slot."""
    return f"apirouter:rlh:{{{org}}}:{scope}"


def bucket_place(org: str, bucket: str) -> tuple[str, int]:
    """A bucket's hash key and its place in it (1: the rpm fields, 3: the tpm ones)."""
    scope, _, limit = bucket.rpartition(":")
    return scope_key(org, scope), _OFFSET[limit]


def bucket_fields(bucket: str) -> tuple[str, str]:
    """A bucket's fields in its hash: its level and that level's time."""
    return _LIMIT_FIELDS[bucket.rpartition(":")[2]]


def level_address(org: str, bucket: str) -> tuple[str, str]:
    """What LEVEL_LUA takes for a bucket: its hash (KEYS 1: declared, as Redis Cluster wants
    of every key a script reads) and its limit (ARGV 1)."""
    scope, _, limit = bucket.rpartition(":")
    return scope_key(org, scope), limit


def budget_key(org: str, scope: str, period: str) -> str:
    """``period`` is the period id (2026-11-29, 2026-11) the reservation was made in."""
    return f"apirouter:budget:{{{org}}}:{scope}:{period}"


def reservation_key(org: str, rid: str) -> str:
    return f"apirouter:res:{{{org}}}:{rid}"


def nonce_key(org: str, key_id: str, nonce: str) -> str:
    return f"apirouter:nonce:{{{org}}}:{key_id}:{nonce}"


def bucket_layout(org: str, names: Sequence[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The bucket hashes of buckets ``names`` (in order of first use) and, per bucket, its
    hash's index (1-based) and its place in it, as ADMIT and RELEASE take them."""
    keys: list[str] = []
    places = []
    for name in names:
        key, offset = bucket_place(org, name)
        if key not in keys:
            keys.append(key)
        places.append((keys.index(key) + 1, offset))
    return keys, places


# -- the admission command, from kept fragments ---------------------------------------------------

_EVALSHA = bulk_str("EVALSHA")
_ZERO = bulk_int(0)
_BUCKET_TTL = bulk_int(BUCKET_TTL_MS)


def _bucket_args(org: str, specs: Sequence[tuple[str, int, int]]
                 ) -> tuple[list[bytes], list[bytes]]:
    """The bucket hashes' encodings of buckets (name, capacity, per minute), and per bucket
    the encoding of its hash index, place, capacity and per minute (its cost follows)."""
    keys, places = bucket_layout(org, [name for name, _, _ in specs])
    return ([bulk_str(k) for k in keys],
            [bulk_int(k) + bulk_int(o) + bulk_int(capacity) + bulk_int(per_minute)
             for (k, o), (_, capacity, per_minute) in zip(places, specs, strict=True)])


@dataclass(slots=True)
class _Fragments:
    """What ADMIT's EVALSHA holds for one key, org and model (and bucket count) while the same
    tiers are in force: everything but the reservation id, the costs and any budget or nonce."""

    tiers: tuple[Tier, Tier | None, Tier | None]
    sha: str
    head: bytes  # "*count", EVALSHA, sha, KEYS count, bucket hashes: no budget, no nonce
    evalsha: bytes  # EVALSHA, sha
    bucket_keys: bytes  # the bucket hashes
    h: int  # how many
    args_head: bytes  # h, n, m 0, nonce ttl 0: no budget, no nonce
    hn: bytes  # h, n
    per_bucket: tuple[bytes, ...]  # hash index, place, capacity, per minute (the cost follows)
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
        # (org, bucket) -> (capacity, per minute, hash key, capacity and per minute)
        self._buckets: dict[tuple[str, str], tuple[int, int, bytes, bytes]] = {}

    def bucket(self, org: str, s: BucketSpec) -> tuple[bytes, bytes]:
        """A token bucket's hash key, and its capacity and per minute, as SETTLE_MANY takes
        them (kept per org and bucket while its limits stay the same)."""
        k = self._buckets.get((org, s.name))
        if k is None or k[0] != s.capacity or k[1] != s.per_minute:
            if len(self._buckets) >= self.MAX_PLANS:
                self._buckets.clear()
            k = self._buckets[(org, s.name)] = (
                s.capacity, s.per_minute, bulk_str(bucket_place(org, s.name)[0]),
                bulk_int(s.capacity) + bulk_int(s.per_minute))
        return k[2], k[3]

    @staticmethod
    def settle_many(sha: str, keys: list[bytes], args: list[bytes]) -> bytes:
        """SETTLE_MANY's EVALSHA over ``keys`` (``bucket``'s) and, per key, ``bucket``'s
        capacity and per minute followed by the delta's bulk string."""
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
        keys, per_bucket = _bucket_args(key.org, [(s.name, s.capacity, s.per_minute)
                                                  for s in specs])
        h = len(keys)
        hn = bulk_int(h) + bulk_int(n)
        f = _Fragments((key.limits, org, model_limits), sha,
                       b"*%d\r\n" % (8 + h + 5 * n) + evalsha + bulk_int(h + 1) +
                       b"".join(keys), evalsha, b"".join(keys), h, hn + _ZERO + _ZERO, hn,
                       tuple(per_bucket), reservation_key(key.org, ""))
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
        n, h = len(specs), f.h
        if r is None or not budgets:
            if nonce is None:
                out = [f.head, res, f.args_head]
            else:
                out = [b"*%d\r\n" % (9 + h + 5 * n), f.evalsha, bulk_int(h + 2), f.bucket_keys,
                       res, bulk_str(nonce_key(key.org, key.key_id, nonce)), f.hn, _ZERO,
                       bulk_int(nonce_ttl_ms if nonce else 0)]
            for fixed, s in zip(f.per_bucket, specs, strict=True):
                out += (fixed, bulk_int(s.cost))
            return b"".join(out)
        m = len(budgets)
        out = [b"*%d\r\n" % (8 + h + 5 * n + 8 * m + (nonce is not None)), f.evalsha,
               bulk_int(h + m + 1 + (nonce is not None)), f.bucket_keys]
        out += [bulk_str(budget_key(key.org, b.scope, p))
                for b, p in zip(budgets, periods, strict=True)]
        out.append(res)
        if nonce is not None:
            out.append(bulk_str(nonce_key(key.org, key.key_id, nonce)))
        out += (f.hn, bulk_int(m), bulk_int(nonce_ttl_ms if nonce else 0))
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
    formatting); and the settlement's fragments of the plan's token-buckets (the hash key, and
    the capacity and per minute, as ScriptCommands.bucket makes them). Kept on the plan
    (BucketPlan.redis) by ``planned_admit``. Made from kept fragments (ScriptCommands.command)
    the command cost ~300 bytecodes a request (buckets_for's specs, a fragment lookup, an
    encoding per cost)."""

    __slots__ = ("sha", "template", "res_len", "token_buckets", "org", "settle_keys",
                 "settle_fixed", "settle_one", "many_keys", "many_args", "many_count")

    def __init__(self, plan: BucketPlan, org: str, sha: str) -> None:
        self.sha = sha
        self.org = org
        steps = plan.steps
        n = len(steps)
        res_prefix = reservation_key(org, "").encode()
        self.res_len = len(res_prefix)
        keys, per_bucket = _bucket_args(org, [(name, capacity, per_minute)
                                              for _, name, capacity, per_minute in steps])
        h = len(keys)
        parts = [b"*%d\r\n" % (8 + h + 5 * n), _EVALSHA, bulk_str(sha), bulk_int(h + 1), *keys]
        template = [_escaped(b"".join(parts)), b"$%d\r\n", _escaped(res_prefix), b"%s\r\n",
                    bulk_int(h) + bulk_int(n) + _ZERO + _ZERO]
        for (spec, _, _, _), f in zip(steps, per_bucket, strict=True):
            template += (_escaped(f), b"%s" if spec is None else _escaped(bulk_int(spec.cost)))
        self.template = b"".join(template)
        # Its part of an ADMIT_MANY call (admit_many_command): its KEYS (the hashes, the
        # reservation id spliced in) and its ARGV (h, n, the buckets with the token count
        # spliced in), and how many arguments both are
        self.many_keys = b"".join((_escaped(b"".join(keys)), b"$%d\r\n", _escaped(res_prefix),
                                   b"%s\r\n"))
        args = [_escaped(bulk_int(h) + bulk_int(n))]
        for (spec, _, _, _), f in zip(steps, per_bucket, strict=True):
            args += (_escaped(f), b"%s" if spec is None else _escaped(bulk_int(spec.cost)))
        self.many_args = b"".join(args)
        self.many_count = (h + 1, 2 + 5 * n)
        self.token_buckets = sum(spec is None for spec, _, _, _ in steps)
        self.settle_keys = tuple(bulk_str(bucket_place(org, name)[0])
                                 for spec, name, _, _ in steps if spec is None)
        self.settle_fixed = tuple(bulk_int(capacity) + bulk_int(per_minute)
                                  for spec, _, capacity, per_minute in steps if spec is None)
        # settle_fixed's one fragment, when the plan has one token-bucket (the common plan)
        self.settle_one = self.settle_fixed[0] if len(self.settle_fixed) == 1 else None

    def command(self, rid: str, tokens: int) -> bytes:
        """The command of a request of ``tokens`` (> 0) with reservation id ``rid``: as
        ScriptCommands.command(sha, ..., plan.specs(tokens), rid, None, 0, (), (), None)."""
        cost = SMALL_BULK_INTS[tokens] if tokens < 1024 else bulk_int(tokens)  # (bulk_int's)
        res = rid.encode()
        if self.token_buckets == 1:  # (the common plan: no tuple of costs made)
            return self.template % (self.res_len + len(res), res, cost)
        return self.template % (self.res_len + len(res), res, *(cost,) * self.token_buckets)


def admit_many_command(sha: str, commands: Sequence[PlannedAdmit], rids: Sequence[str],
                       tokens: Sequence[int]) -> bytes:
    """ADMIT_MANY's EVALSHA over admissions of one org: each its plan's command, reservation id
    and token count (> 0), in order."""
    keys: list[bytes] = []
    args: list[bytes] = []
    nk = na = 0
    for p, rid, t in zip(commands, rids, tokens, strict=True):
        res = rid.encode()
        keys.append(p.many_keys % (p.res_len + len(res), res))
        cost = SMALL_BULK_INTS[t] if t < 1024 else bulk_int(t)
        args.append(p.many_args % ((cost,) * p.token_buckets))
        k, a = p.many_count
        nk += k
        na += a
    return b"".join((b"*%d\r\n" % (4 + nk + na), _EVALSHA, bulk_str(sha), bulk_int(nk), *keys,
                     bulk_int(len(rids)), *args))


def planned_admit(plan: BucketPlan, org: str, sha: str) -> PlannedAdmit:
    """The plan's PlannedAdmit (``org``: its key's), kept on it while the script is ``sha``."""
    p: PlannedAdmit | None = plan.redis
    if p is None or p.sha != sha:
        p = plan.redis = PlannedAdmit(plan, org, sha)
    return p


def _escaped(b: bytes) -> bytes:
    """``b`` as literal text of a bytes % template."""
    return b.replace(b"%", b"%%")
