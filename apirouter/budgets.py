"""Budgets and quotas per org and per key, per day or month; prices per model. Pure.

    budgets:
      org:acme:          {period: month, spend: 500.0, tokens: 50000000}
      key:key_search:    {period: day, spend: 5.0, requests: 20000}

``spend`` is in the currency of the price table (models.<name>.price: prompt_per_1k,
completion_per_1k); ``tokens`` and ``requests`` are quotas. Admission reserves the most a
request can cost (its prompt estimate plus max_tokens), and refuses with 402 BUDGET_EXCEEDED
(spend) or QUOTA_EXCEEDED (tokens, requests) when the reservation does not fit; the response
settles the reservation to actual usage and a failed request releases it. Amounts are kept in
micro-units (integers) so Redis can add them exactly. Periods are calendar days or months, UTC.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apirouter.config import ConfigError

MICRO = 1_000_000
PERIODS = ("day", "month")
UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Price:
    prompt_per_1k: float
    completion_per_1k: float

    def cost_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        return int(round((prompt_tokens * self.prompt_per_1k
                          + completion_tokens * self.completion_per_1k) * MICRO / 1000))


@dataclass(frozen=True, slots=True)
class Budget:
    scope: str  # "org:<org>" or "key:<key id>"
    period: str
    spend_micro: int  # UNLIMITED when not set
    tokens: int
    requests: int


@dataclass(frozen=True, slots=True)
class Reservation:
    spend_micro: int
    tokens: int
    requests: int


def parse_price(raw: Any, where: str) -> Price:
    if not isinstance(raw, dict) or set(raw) - {"prompt_per_1k", "completion_per_1k"}:
        raise ConfigError(f"{where}: expected {{prompt_per_1k, completion_per_1k}}")
    values = []
    for name in ("prompt_per_1k", "completion_per_1k"):
        v = raw.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{where}.{name}: a non-negative number")
        values.append(float(v))
    return Price(*values)


def parse_budgets(raw: Any) -> tuple[Budget, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("budgets: expected a mapping of 'org:NAME' or 'key:ID' -> budget")
    out = []
    for scope, b in raw.items():
        where = f"budgets.{scope}"
        if not isinstance(scope, str) or not scope.startswith(("org:", "key:")) or len(
                scope) < 5:
            raise ConfigError(f"{where}: scopes are 'org:NAME' or 'key:ID'")
        if not isinstance(b, dict) or set(b) - {"period", "spend", "tokens", "requests"}:
            raise ConfigError(f"{where}: expected {{period, spend, tokens, requests}}")
        period = b.get("period", "month")
        if period not in PERIODS:
            raise ConfigError(f"{where}.period: day or month")
        limits = []
        for name, scale in (("spend", MICRO), ("tokens", 1), ("requests", 1)):
            v = b.get(name)
            if v is None:
                limits.append(UNLIMITED)
            elif isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"{where}.{name}: a non-negative number")
            else:
                limits.append(int(round(v * scale)))
        if all(v == UNLIMITED for v in limits):
            raise ConfigError(f"{where}: set at least one of spend, tokens, requests")
        out.append(Budget(scope, period, *limits))
    return tuple(out)


def applicable(budgets: Mapping[str, Budget], org: str, key_id: str) -> list[Budget]:
    if not budgets:  # no budgets configured: the common case, no names to build
        return []
    return [b for s in (f"org:{org}", f"key:{key_id}") if (b := budgets.get(s)) is not None]


def period_id(period: str, now: float | None = None) -> str:
    t = time.gmtime(time.time() if now is None else now)
    return time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", t)


def period_ttl_ms(period: str) -> int:
    return (2 if period == "day" else 62) * 86_400_000


def reservation(price: Price | None, prompt_tokens: int, completion_tokens: int) -> Reservation:
    spend = price.cost_micro(prompt_tokens, completion_tokens) if price else 0
    return Reservation(spend, prompt_tokens + completion_tokens, 1)


def refused(budget: Budget, used: Mapping[str, int], r: Reservation) -> str | None:
    """Which dimension a reservation would exceed ('spend', 'tokens', 'requests'), or None."""
    for name, limit, need in (("spend", budget.spend_micro, r.spend_micro),
                              ("tokens", budget.tokens, r.tokens),
                              ("requests", budget.requests, r.requests)):
        if limit != UNLIMITED and used.get(name, 0) + need > limit:
            return name
    return None
