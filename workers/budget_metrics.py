"""Budgets' remaining share as Prometheus gauges, read when /metrics is scraped.

Budgets are few (declared in the config) and their state lives in Redis (or, without Redis,
in each worker), so the scrape reads them the way GET /v1/admin/budgets does instead of the
hot path keeping gauges: ``router_budget_remaining_ratio{scope,dimension}`` is remaining /
limit of the current period (1: untouched, 0: exhausted). With Redis it covers every router
sharing it; with the in-process limiter, the share of the worker that answered the scrape.
Nothing is exported while Redis does not answer (the admission check of readyz says why).
"""

from __future__ import annotations

from apirouter.redis_client import RedisUnavailable
from apirouter.table import RoutingTable
from workers.admission import Admission, budget_usage

NAME = "router_budget_remaining_ratio"
DIMENSIONS = ("spend", "tokens", "requests")


def key_orgs(table: RoutingTable) -> dict[str, str]:
    """The org of each ``key:ID`` budget scope."""
    return {f"key:{k.key_id}": k.org for k in table.keys.values()}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def budget_exposition(admission: Admission, table: RoutingTable) -> bytes:
    if not table.budgets:
        return b""
    try:
        rows = await budget_usage(admission, table.limits, list(table.budgets.values()),
                                  key_orgs(table))
    except RedisUnavailable:
        return b""
    lines = [f"# HELP {NAME} Remaining share of each budget this period (1 untouched, 0 spent)",
             f"# TYPE {NAME} gauge"]
    for row in rows:
        for d in DIMENSIONS:
            cell = row[d]
            assert isinstance(cell, dict)
            if cell["limit"]:
                ratio = cell["remaining"] / cell["limit"]
                lines.append(f'{NAME}{{scope="{_label(str(row["scope"]))}",dimension="{d}"}} '
                             f"{ratio:.6g}")
    return ("\n".join(lines) + "\n").encode()
