"""Operator overrides of routing: validation and the stored record. Pure.

An override pins a model to a backend, replaces a model's weights, drains a backend (no new
traffic) or marks it degraded (used only when nothing better is left), optionally for a time
to live. Records are what the config store keeps (etcd ``{prefix}/overrides/{id}``, or a local
file without etcd); compile_table applies the unexpired ones.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from apirouter.config import RouterConfig
from apirouter.errors import RouterError
from apirouter.table import Override

KINDS = ("pin", "weights", "drain", "degrade")
MAX_TTL_S = 30 * 24 * 3600.0


def _invalid(message: str, field: str) -> RouterError:
    return RouterError("INVALID_REQUEST", message, field=field)


def new_record(req: Any, cfg: RouterConfig, actor: str, now: float | None = None
               ) -> dict[str, Any]:
    """Validate an override request against the config in force; return the record to store."""
    if not isinstance(req, dict):
        raise _invalid("an override is a JSON object", "kind")
    kind, target = req.get("kind"), req.get("target")
    if kind not in KINDS:
        raise _invalid(f"'kind' must be one of {', '.join(KINDS)}", "kind")
    if not isinstance(target, str) or not target:
        raise RouterError("MISSING_FIELD", "'target' (a model or backend id) is required",
                          field="target")
    models = {m.name: m for m in cfg.models}
    backends = {b.id for b in cfg.backends}
    record: dict[str, Any] = {"kind": kind, "target": target}
    if kind in ("drain", "degrade"):
        if target not in backends:
            raise RouterError("NOT_FOUND", f"no backend '{target}'", field="target")
    else:
        if target not in models:
            raise RouterError("MODEL_NOT_FOUND", f"no model '{target}'", field="target")
        if kind == "pin":
            backend = req.get("backend")
            if backend not in backends:
                raise _invalid("'backend' must name a configured backend", "backend")
            record["backend"] = backend
        else:
            weights = req.get("weights")
            own = {t.backend for t in models[target].targets}
            if (not isinstance(weights, dict) or not weights
                    or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w
                               <= 1_000_000 for w in weights.values())):
                raise _invalid("'weights' maps backends to integers 0..1000000", "weights")
            if set(weights) - own:
                raise _invalid(f"'weights' may only name this model's backends {sorted(own)}",
                               "weights")
            if not any(weights.get(t.backend, t.weight) for t in models[target].targets):
                raise _invalid("at least one weight must stay > 0", "weights")
            record["weights"] = weights
    ttl = req.get("ttl_s")
    now = time.time() if now is None else now
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
            raise _invalid(f"'ttl_s' must be a number of seconds up to {MAX_TTL_S:g}", "ttl_s")
        record["expires_at"] = now + float(ttl)
    else:
        record["expires_at"] = None
    record.update(id="ovr_" + secrets.token_hex(6), created_at=now, created_by=actor)
    return record


def to_override(record: dict[str, Any]) -> Override | None:
    """The table's Override for a stored record; None for a record this code cannot read."""
    try:
        return Override(record["kind"], record["target"], record.get("backend"),
                        record.get("weights"), record.get("expires_at"))
    except (KeyError, TypeError):
        return None


def active(records: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
    return {i: r for i, r in records.items()
            if r.get("expires_at") is None or r["expires_at"] > now}


def next_expiry(records: dict[str, dict[str, Any]], now: float) -> float | None:
    times = [r["expires_at"] for r in records.values()
             if r.get("expires_at") is not None and r["expires_at"] > now]
    return min(times) if times else None
