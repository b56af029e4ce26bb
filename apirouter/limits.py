"""Rate limits as token buckets: which buckets a request touches, and the bucket arithmetic.

A request is admitted only if every applicable bucket holds enough tokens; then all of them are
charged at once (Redis runs this as one Lua script; the embedded limiter runs ``take_all``
below, which is also the model the Lua script is tested against). Buckets:

    key:{id}:rpm, key:{id}:tpm            the key's tier (or its own limits)
    org:{org}:rpm, org:{org}:tpm          optional, from the config's ``orgs`` section
    key:{id}:model:{m}:rpm / :tpm         optional, from the model's ``limits``

A token bucket of rate r per minute and capacity b (the burst) admits at most b + r*t/60 over
any window of t seconds: that is the exactness property the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from apirouter.keys import KeyRecord, Tier


# Value objects, not frozen: one of each is made for every admitted request, and a frozen
# dataclass's __init__ costs ~0.4 µs more (an object.__setattr__ per field). Nothing mutates
# them; request-buckets are shared through the plans below.
@dataclass(slots=True)
class BucketSpec:
    name: str
    capacity: int
    per_minute: int
    cost: int

    @property
    def refill_per_ms(self) -> float:
        return self.per_minute / 60_000.0


class Verdict(NamedTuple):
    """An admission's decision. A tuple: one is made for every request, and the hot paths
    make it with ``new_verdict`` (tuple.__new__: no Python frame; a slotted dataclass's
    __init__ was ~30 bytecodes a request)."""

    allowed: bool
    failed: BucketSpec | None  # the first bucket that refused
    remaining: int  # tokens left in the reported bucket (the failing one, else the key's rpm)
    retry_after_ms: int  # until the failing bucket holds enough; 0 when allowed
    reset_ms: int  # until the reported bucket is full again


# new_verdict(Verdict, (allowed, failed, remaining, retry_after_ms, reset_ms)): Verdict(...)
new_verdict = tuple.__new__


def buckets_for(key: KeyRecord, model: str, tokens: int, org: Tier | None = None,
                model_limits: Tier | None = None) -> list[BucketSpec]:
    """The buckets one request charges: 1 per request-bucket, ``tokens`` per token-bucket."""
    return plan_for(key, model, org, model_limits).specs(tokens)


class BucketPlan:
    """What of a request's buckets does not depend on its token count: names, tiers, the
    request-buckets themselves, and the Limit and Policy headers of the reported (first)
    bucket. Planned once per key, org and model and reused while the same tier objects are in
    force (a table reload makes new ones): buckets_for 1.47 -> ~0.6 µs a request; the
    in-process limiter charges a plan as it is (BucketTable.take_planned), with no object
    made per bucket."""

    __slots__ = ("key_limits", "org", "model_limits", "steps", "capacity", "limit_header",
                 "policy_header", "records", "token_records", "redis")

    def __init__(self, key_limits: Tier, org: Tier | None, model_limits: Tier | None,
                 steps: list[tuple[BucketSpec | None, str, int, int]]) -> None:
        self.key_limits = key_limits  # the tiers it was planned for
        self.org = org
        self.model_limits = model_limits
        # (request-bucket spec | None for a token-bucket, name, capacity, per_minute)
        self.steps = steps
        # The reported (first) bucket's capacity and Limit and Policy headers ("": no bucket)
        self.capacity = 0
        texts = ("", "")
        if steps:
            _, _, self.capacity, per_minute = steps[0]
            texts = limit_texts(self.capacity, per_minute)
        self.limit_header = ("X-RateLimit-Limit", texts[0])
        self.policy_header = ("X-RateLimit-Policy", texts[1])
        # The bucket table's records of the buckets (cost None for a token-bucket: the
        # request's tokens) and of the token-buckets alone, made by it on first use
        # (apirouter/shared_buckets.py: BucketTable.take_planned)
        self.records: tuple[tuple[int, int, int, int, int | None], ...] | None = None
        self.token_records: tuple[tuple[int, int, int, int, int | None], ...] = ()
        # ADMIT's command for the plan on Redis, less the request's values, made by
        # workers.admission_scripts (planned_admit) on first use
        self.redis: Any = None

    def specs(self, tokens: int) -> list[BucketSpec]:
        """buckets_for(..., tokens, ...) of the plan's key, org and model."""
        return [spec if spec is not None else BucketSpec(name, capacity, per_minute, tokens)
                for spec, name, capacity, per_minute in self.steps if spec is not None or tokens]

    def spec(self, index: int, tokens: int) -> BucketSpec:
        """The ``index``-th bucket of buckets_for(..., tokens, ...), for ``tokens`` > 0."""
        spec, name, capacity, per_minute = self.steps[index]
        return spec if spec is not None else BucketSpec(name, capacity, per_minute, tokens)


def plan_for(key: KeyRecord, model: str, org: Tier | None = None,
             model_limits: Tier | None = None) -> BucketPlan:
    """The plan of a request of ``key`` for ``model`` under these tiers (kept)."""
    plan = _PLANS.get((key.key_id, key.org, model))
    if plan is None or plan.key_limits is not key.limits or plan.org is not org or \
            plan.model_limits is not model_limits:
        plan = _plan(key, model, org, model_limits)
    return plan


# by (key id, org, model); ``kept_plan`` is its get, for callers that take plan_for's first
# step inline (the admissions: a call a request fewer)
_PLANS: dict[tuple[str, str, str], BucketPlan] = {}
kept_plan = _PLANS.get
_MAX_PLANS = 65536


def _plan(key: KeyRecord, model: str, org: Tier | None, model_limits: Tier | None
          ) -> BucketPlan:
    steps: list[tuple[BucketSpec | None, str, int, int]] = []
    for prefix, tier in ((f"key:{key.key_id}", key.limits),
                         (f"org:{key.org}", org),
                         (f"key:{key.key_id}:model:{model}", model_limits)):
        if tier is None:
            continue
        if tier.rpm:
            steps.append((BucketSpec(f"{prefix}:rpm", tier.rpm_burst, tier.rpm, 1),
                          f"{prefix}:rpm", tier.rpm_burst, tier.rpm))
        if tier.tpm:
            steps.append((None, f"{prefix}:tpm", tier.tpm_burst, tier.tpm))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    plan = _PLANS[(key.key_id, key.org, model)] = BucketPlan(key.limits, org, model_limits,
                                                             steps)
    return plan


@dataclass(slots=True)
class BucketState:
    tokens: float
    at_ms: float


def level(spec: BucketSpec, state: BucketState | None, now_ms: float) -> float:
    if state is None:
        return float(spec.capacity)
    return min(float(spec.capacity),
               state.tokens + max(0.0, now_ms - state.at_ms) * spec.refill_per_ms)


def take_all(specs: list[BucketSpec], states: dict[str, BucketState], now_ms: float) -> Verdict:
    """Charge every bucket or none (mutates ``states`` only when admitting)."""
    levels = []
    for spec in specs:
        tokens = level(spec, states.get(spec.name), now_ms)
        if tokens < spec.cost:
            rate = spec.refill_per_ms
            retry = math.ceil((spec.cost - tokens) / rate) if rate > 0 else 60_000
            return Verdict(False, spec, max(0, int(tokens)), retry,
                           _reset(spec, tokens))
        levels.append(tokens)
    for spec, tokens in zip(specs, levels, strict=True):
        states[spec.name] = BucketState(tokens - spec.cost, now_ms)
    if not specs:
        return Verdict(True, None, 0, 0, 0)
    first = specs[0]
    left = levels[0] - first.cost
    return Verdict(True, None, max(0, int(left)), 0, _reset(first, left))


def settle(spec: BucketSpec, states: dict[str, BucketState], now_ms: float,
           delta: int) -> None:
    """Refund (delta < 0) or charge more (delta > 0) after the fact; a bucket may go negative."""
    tokens = level(spec, states.get(spec.name), now_ms)
    states[spec.name] = BucketState(min(float(spec.capacity), tokens - delta), now_ms)


def _reset(spec: BucketSpec, tokens: float) -> int:
    rate = spec.refill_per_ms
    return math.ceil((spec.capacity - tokens) / rate) if rate > 0 else 0


def rate_limit_headers(spec: BucketSpec, v: Verdict, now: float) -> list[tuple[str, str]]:
    """The X-RateLimit-* headers for the reported bucket (the key's first one when admitted, the
    one that refused otherwise), all about that one bucket: ``Limit`` is its capacity — the
    burst, the most the client can spend at once, which refills at ``per_minute`` —
    ``Remaining`` what is left of it (never above ``Limit``), ``Reset`` the unix second when
    it is full again, and ``Policy`` states both numbers (``CAPACITY;w=60;rate=PER_MINUTE``)."""
    capacity = spec.capacity
    texts = limit_texts(capacity, spec.per_minute)
    remaining = v.remaining
    if not 0 <= remaining <= capacity:
        remaining = max(0, min(capacity, remaining))
    return [("X-RateLimit-Limit", texts[0]),
            ("X-RateLimit-Remaining", str(remaining)),
            ("X-RateLimit-Reset", str(math.ceil(now + v.reset_ms / 1000))),
            ("X-RateLimit-Policy", texts[1])]


def planned_headers(plan: BucketPlan, v: Verdict, now: float) -> list[tuple[str, str]]:
    """rate_limit_headers of a request admitted on ``plan`` (about its first bucket), with
    the Limit and Policy headers the plan keeps. (Admitted, the bucket's ``remaining`` is
    what is left of at most its capacity: nothing to clamp.)"""
    return [plan.limit_header,
            ("X-RateLimit-Remaining", str(v.remaining)),
            ("X-RateLimit-Reset", str(math.ceil(now + v.reset_ms / 1000))),
            plan.policy_header]


def limit_texts(capacity: int, per_minute: int) -> tuple[str, str]:
    """The Limit and Policy header values of a bucket, formatted once per kind of bucket
    (~0.2 µs a response less)."""
    texts = _LIMIT_TEXTS.get((capacity, per_minute))
    if texts is None:
        if len(_LIMIT_TEXTS) > 4096:  # bounded whatever the tables hold over time
            _LIMIT_TEXTS.clear()
        texts = _LIMIT_TEXTS[capacity, per_minute] = (
            str(capacity), f"{capacity};w=60;rate={per_minute}")
    return texts


# (capacity, per_minute) -> the Limit and Policy header values (rate_limit_headers)
_LIMIT_TEXTS: dict[tuple[int, int], tuple[str, str]] = {}


# A backend that reports more tokens than this for one request is broken: its count is treated
# as not reported (the reservation stands) rather than settled (a delta that would lock the key
# out) or recorded (orjson refuses integers beyond 64 bits: the client would get a 500).
MAX_REPORTED_TOKENS = 1_000_000_000


def reported_count(value: Any) -> int | None:
    """A token count as a backend reported it, if it is one: an int (not a bool) from 0 to
    MAX_REPORTED_TOKENS."""
    if isinstance(value, int) and not isinstance(value, bool) and \
            0 <= value <= MAX_REPORTED_TOKENS:
        return value
    return None


def estimate_tokens(prompt_bytes: int, max_tokens: int | None, default_completion: int) -> int:
    """What a request may consume, reserved at admission: ~4 bytes a token for the prompt, plus
    ``max_tokens`` (or a default) for the completion. Settled to actual usage afterwards."""
    return max(1, prompt_bytes // 4) + (max_tokens if max_tokens else default_completion)
