from __future__ import annotations

import pytest

from apirouter.budgets import (
    UNLIMITED,
    Budget,
    Price,
    applicable,
    parse_budgets,
    period_id,
    refused,
    reservation,
)
from apirouter.config import ConfigError


def test_parse_and_apply() -> None:
    budgets = {b.scope: b for b in parse_budgets({
        "org:acme": {"period": "month", "spend": 12.5},
        "key:k1": {"period": "day", "tokens": 1000, "requests": 10}})}
    assert budgets["org:acme"] == Budget("org:acme", "month", 12_500_000, UNLIMITED, UNLIMITED)
    assert [b.scope for b in applicable(budgets, "acme", "k1")] == ["org:acme", "key:k1"]
    assert applicable(budgets, "other", "k9") == []


@pytest.mark.parametrize(("raw", "message"), [
    ({"acme": {"spend": 1}}, "scopes"), ({"org:a": {"period": "week", "spend": 1}}, "period"),
    ({"org:a": {"period": "day"}}, "at least one"), ({"org:a": {"spend": -1}}, "non-negative")])
def test_invalid_budgets(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_budgets(raw)


def test_reservation_cost_and_refusal() -> None:
    r = reservation(Price(1.0, 2.0), 500, 1000)
    assert (r.spend_micro, r.tokens, r.requests) == (2_500_000, 1500, 1)
    b = Budget("key:k", "day", 3_000_000, UNLIMITED, 2)
    assert refused(b, {"spend": 0}, r) is None
    assert refused(b, {"spend": 600_000}, r) == "spend"
    assert refused(b, {"requests": 2}, r) == "requests"
    assert period_id("day", 0) == "1970-01-01" and period_id("month", 0) == "1970-01"
