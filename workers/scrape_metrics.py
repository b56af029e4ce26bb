"""Gauges read when /metrics is scraped: how much of each budget and each org's rate limit is
left. Both are few (declared in the config) and their state lives in Redis (or, without Redis,
in each worker), so the scrape reads them the way GET /v1/admin/budgets does instead of the
hot path keeping gauges.

- ``router_budget_remaining_ratio{scope,dimension}``: remaining / limit of the current period
  (1: untouched, 0: exhausted).
- ``router_ratelimit_remaining_ratio{org,limit}``: the org's token bucket (``rpm``, ``tpm``)
  level / capacity now (1: full burst available, 0: the org is being refused).

With Redis they cover every router sharing it; with the in-process limiter, the instance that
answered the scrape (its workers share the buckets). Nothing is exported while Redis does not
answer (readyz's admission check says why).
"""

from __future__ import annotations

import time

from apirouter.limits import BucketSpec, level
from apirouter.redis_client import RedisError, RedisUnavailable
from apirouter.table import RoutingTable
from workers.admission import Admission, budget_usage
from workers.admission_scripts import LEVEL_LUA, level_address

BUDGET = "router_budget_remaining_ratio"
RATELIMIT = "router_ratelimit_remaining_ratio"
DIMENSIONS = ("spend", "tokens", "requests")


def key_orgs(table: RoutingTable) -> dict[str, str]:
    """The org of each ``key:ID`` budget scope."""
    return {f"key:{k.key_id}": k.org for k in table.keys.values()}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def org_buckets(table: RoutingTable) -> list[tuple[str, str, BucketSpec]]:
    """(org, limit, the org's bucket as admission charges it) for every org with a limit."""
    out = []
    for org, tier in sorted(table.orgs.items()):
        for limit, rate, burst in (("rpm", tier.rpm, tier.rpm_burst),
                                   ("tpm", tier.tpm, tier.tpm_burst)):
            if rate:
                out.append((org, limit, BucketSpec(f"org:{org}:{limit}", burst, rate, 1)))
    return out


async def _bucket_levels(admission: Admission, table: RoutingTable,
                         buckets: list[tuple[str, str, BucketSpec]]) -> list[float]:
    client = admission.client_for(table.limits)
    if client is None:
        now = time.monotonic() * 1000
        return [level(spec, admission.local_bucket(spec.name), now) for _, _, spec in buckets]
    out = []
    for org, _, spec in buckets:
        key, limit = level_address(org, spec.name)
        reply = await client.execute("EVAL", LEVEL_LUA, 1, key, limit,
                                     spec.capacity, repr(spec.refill_per_ms),
                                     timeout=max(0.05, table.limits.redis_timeout_ms / 1000))
        if isinstance(reply, RedisError) or not isinstance(reply, bytes | int):
            raise RedisUnavailable(str(reply))
        out.append(float(reply))
    return out


SCRAPE_TTL_S = 1.0
_last: tuple[RoutingTable, float, bytes] | None = None  # (table, when, exposition)


async def scrape_exposition(admission: Admission, table: RoutingTable) -> bytes:
    """The gauges, read at most once a second per worker for a given table: /metrics needs no
    credential, and each read is one Redis call per org and budget - scraping faster must not
    let anyone drive load onto Redis."""
    global _last
    now = time.monotonic()
    if _last is not None and _last[0] is table and now - _last[1] < SCRAPE_TTL_S:
        return _last[2]
    out = await _read(admission, table)
    _last = (table, now, out)
    return out


async def _read(admission: Admission, table: RoutingTable) -> bytes:
    lines: list[str] = []
    try:
        if table.budgets:
            rows = await budget_usage(admission, table.limits, list(table.budgets.values()),
                                      key_orgs(table))
            lines += [f"# HELP {BUDGET} Remaining share of each budget this period",
                      f"# TYPE {BUDGET} gauge"]
            for row in rows:
                for d in DIMENSIONS:
                    cell = row[d]
                    assert isinstance(cell, dict)
                    if cell["limit"]:
                        lines.append(f'{BUDGET}{{scope="{_label(str(row["scope"]))}",'
                                     f'dimension="{d}"}} {cell["remaining"] / cell["limit"]:.6g}')
        buckets = org_buckets(table)
        if buckets:
            levels = await _bucket_levels(admission, table, buckets)
            lines += [f"# HELP {RATELIMIT} Share of each org's rate-limit burst available now",
                      f"# TYPE {RATELIMIT} gauge"]
            for (org, limit, spec), have in zip(buckets, levels, strict=True):
                lines.append(f'{RATELIMIT}{{org="{_label(org)}",limit="{limit}"}} '
                             f"{max(0.0, have) / spec.capacity:.6g}")
    except RedisUnavailable:
        return b""
    return ("\n".join(lines) + "\n").encode() if lines else b""
