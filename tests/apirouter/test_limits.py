"""Token-bucket arithmetic: unit checks and a hypothesis state machine of its invariants."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from apirouter.keys import KeyRecord, Tier
from apirouter.limits import BucketSpec, BucketState, buckets_for, estimate_tokens, settle, take_all

KEY = KeyRecord("k", "a" * 64, "acme", "", frozenset({"inference"}), "developer",
                Tier(60, 100, 6000, 8000), False)


def test_buckets_for_a_request() -> None:
    names = [s.name for s in buckets_for(KEY, "m", 50, Tier(10, 10, 0, 0), Tier(5, 5, 500, 500))]
    assert names == ["key:k:rpm", "key:k:tpm", "org:acme:rpm", "key:k:model:m:rpm",
                     "key:k:model:m:tpm"]
    assert [s.cost for s in buckets_for(KEY, "m", 50)] == [1, 50]


def test_all_or_nothing_and_retry_after() -> None:
    specs = [BucketSpec("a", 10, 60, 1), BucketSpec("b", 2, 60, 1)]
    states: dict[str, BucketState] = {}
    assert take_all(specs, states, 0).allowed and take_all(specs, states, 0).allowed
    refused = take_all(specs, states, 0)
    assert not refused.allowed and refused.failed == specs[1]
    assert refused.retry_after_ms == 1000  # 60/min = one token a second
    assert states["a"].tokens == 8  # the refused request charged nothing
    assert take_all(specs, states, 1000).allowed


def test_settle_refunds_and_charges() -> None:
    spec = BucketSpec("t", 1000, 60_000, 900)
    states: dict[str, BucketState] = {}
    assert take_all([spec], states, 0).allowed
    assert not take_all([spec], states, 0).allowed
    settle(spec, states, 0, -880)  # used 20 of the 900 reserved
    assert take_all([spec], states, 0).allowed


def test_estimate() -> None:
    assert estimate_tokens(400, None, 256) == 356
    assert estimate_tokens(0, 10, 256) == 11


class Buckets(RuleBasedStateMachine):
    """Whatever the sequence of requests and clock steps, a bucket of rate r/min and capacity b
    never admits more than b + r * elapsed, and never holds more than b."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = BucketSpec("x", 20, 600, 1)  # 10 tokens a second
        self.states: dict[str, BucketState] = {}
        self.now = 0.0
        self.admitted = 0

    @rule(cost=st.integers(1, 5))
    def request(self, cost: int) -> None:
        spec = BucketSpec("x", 20, 600, cost)
        if take_all([spec], self.states, self.now).allowed:
            self.admitted += cost

    @rule(ms=st.floats(0, 3000))
    def wait(self, ms: float) -> None:
        self.now += ms

    @rule(delta=st.integers(-10, 10))
    def adjust(self, delta: int) -> None:
        # Settling: a refund (< 0) gives tokens back and counts against what was admitted;
        # extra usage (> 0) only deepens the bucket (debt), making later admission stricter.
        settle(self.spec, self.states, self.now, delta)
        if delta < 0:
            self.admitted += delta

    @invariant()
    def bounded(self) -> None:
        assert self.admitted <= 20 + self.now * self.spec.refill_per_ms + 1e-6
        state = self.states.get("x")
        if state is not None:
            assert state.tokens <= 20 + 1e-9


TestBuckets = Buckets.TestCase
