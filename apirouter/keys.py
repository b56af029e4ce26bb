"""API keys and limit tiers: records, validation, and the authentication decision. Pure.

A key is shown once, when it is created (``ar-`` + 40 url-safe characters); the config store
keeps only its SHA-256 and the record: id, org, team, scopes (``inference``, ``audit``,
``admin``), tier, optional per-key limits, and whether requests must be HMAC-signed. Workers
find a key by the SHA-256 of what the client sent — no network hop, nothing stored in clear.

Tiers (seed 004) give requests-per-minute limits and bursts; tokens-per-minute limits are
ours. A key's own ``rpm``/``tpm`` values override its tier's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apirouter.config import ConfigError
from apirouter.errors import RouterError

SCOPES = ("inference", "audit", "admin")
KEY_PREFIX = "ar-"


@dataclass(frozen=True, slots=True)
class Tier:
    rpm: int
    rpm_burst: int
    tpm: int
    tpm_burst: int


DEFAULT_TIERS: dict[str, Tier] = {
    "admin": Tier(100_000, 120_000, 20_000_000, 24_000_000),
    "developer": Tier(10_000, 12_000, 2_000_000, 2_400_000),
    "viewer": Tier(1_000, 1_200, 200_000, 240_000),
    "billing": Tier(1_000, 1_200, 200_000, 240_000),
}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    sha256: str
    org: str
    team: str
    scopes: frozenset[str]
    tier: str
    limits: Tier
    hmac_required: bool

    @classmethod
    def from_doc(cls, key_id: str, d: Mapping[str, Any]) -> KeyRecord:
        """A record from to_doc() output (already validated when the table was compiled)."""
        return cls(key_id, str(d["sha256"]), str(d["org"]), str(d["team"]),
                   frozenset(d["scopes"]), str(d["tier"]),
                   Tier(int(d["rpm"]), int(d["rpm_burst"]), int(d["tpm"]), int(d["tpm_burst"])),
                   bool(d["hmac"]))

    def to_doc(self) -> dict[str, Any]:
        """The record as stored (config store) and as listed (never the key)."""
        return {"sha256": self.sha256, "org": self.org, "team": self.team,
                "scopes": sorted(self.scopes), "tier": self.tier,
                "rpm": self.limits.rpm, "rpm_burst": self.limits.rpm_burst,
                "tpm": self.limits.tpm, "tpm_burst": self.limits.tpm_burst,
                "hmac": self.hmac_required}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_admin_token(token: str | None, expected_sha256: str) -> bool:
    """Whether ``token`` is the break-glass admin token (configured as its SHA-256)."""
    return bool(token is not None and expected_sha256
                and hmac.compare_digest(hash_key(token), expected_sha256))


def signing_secret(sha256_hex: str) -> bytes:
    """The HMAC secret of a key: derived from its hash, so the store never needs the key."""
    return hashlib.sha256(b"apirouter-hmac:" + bytes.fromhex(sha256_hex)).digest()


def new_key() -> tuple[str, str]:
    """(key id, key): the key is shown once and never stored."""
    return "key_" + secrets.token_hex(6), KEY_PREFIX + secrets.token_urlsafe(30)


def _int(raw: Mapping[str, Any], name: str, default: int, where: str) -> int:
    v = raw.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{where}.{name}: must be a non-negative integer")
    return v


def parse_limits(raw: Any, where: str) -> Tier:
    """A standalone limit set ({rpm, rpm_burst, tpm, tpm_burst}; 0 = unlimited)."""
    if not isinstance(raw, dict) or set(raw) - {"rpm", "rpm_burst", "tpm", "tpm_burst"}:
        raise ConfigError(f"{where}: expected {{rpm, rpm_burst, tpm, tpm_burst}}")
    rpm, tpm = _int(raw, "rpm", 0, where), _int(raw, "tpm", 0, where)
    t = Tier(rpm, _int(raw, "rpm_burst", rpm, where), tpm, _int(raw, "tpm_burst", tpm, where))
    if t.rpm_burst < t.rpm or t.tpm_burst < t.tpm:
        raise ConfigError(f"{where}: a burst cannot be below its rate")
    return t


def parse_orgs(raw: Any) -> dict[str, Tier]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("orgs: expected a mapping of org -> {rpm, rpm_burst, tpm, tpm_burst}")
    return {str(org): parse_limits(v, f"orgs.{org}") for org, v in raw.items()}


def parse_tiers(raw: Any) -> dict[str, Tier]:
    tiers = dict(DEFAULT_TIERS)
    if raw is None:
        return tiers
    if not isinstance(raw, dict):
        raise ConfigError("tiers: expected a mapping of name -> {rpm, rpm_burst, tpm, tpm_burst}")
    for name, t in raw.items():
        where = f"tiers.{name}"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: expected a mapping")
        base = tiers.get(name, DEFAULT_TIERS["viewer"])
        rpm = _int(t, "rpm", base.rpm, where)
        tpm = _int(t, "tpm", base.tpm, where)
        tier = Tier(rpm, _int(t, "rpm_burst", max(rpm, base.rpm_burst), where), tpm,
                    _int(t, "tpm_burst", max(tpm, base.tpm_burst), where))
        if tier.rpm_burst < tier.rpm or tier.tpm_burst < tier.tpm:
            raise ConfigError(f"{where}: a burst cannot be below its rate")
        tiers[name] = tier
    return tiers


def parse_key(key_id: Any, raw: Any, tiers: Mapping[str, Tier]) -> KeyRecord:
    where = f"keys.{key_id}"
    if not isinstance(key_id, str) or not key_id or len(key_id) > 64:
        raise ConfigError(f"{where}: key ids are 1-64 characters")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(raw) - {"sha256", "org", "team", "scopes", "tier", "hmac", "rpm", "rpm_burst",
                          "tpm", "tpm_burst", "created_at", "created_by"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(
            c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"{where}.sha256: the key's SHA-256 as 64 lowercase hex digits")
    org = raw.get("org")
    if not isinstance(org, str) or not org:
        raise ConfigError(f"{where}.org: required")
    scopes = raw.get("scopes", ["inference"])
    if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
        raise ConfigError(f"{where}.scopes: a non-empty list of {', '.join(SCOPES)}")
    tier_name = raw.get("tier", "developer")
    if tier_name not in tiers:
        raise ConfigError(f"{where}.tier: unknown tier {tier_name!r}")
    base = tiers[tier_name]
    # A key's own rate comes without burst unless it names one; otherwise the tier's applies.
    rpm = _int(raw, "rpm", base.rpm, where)
    tpm = _int(raw, "tpm", base.tpm, where)
    limits = Tier(rpm, _int(raw, "rpm_burst", rpm if "rpm" in raw else base.rpm_burst, where),
                  tpm, _int(raw, "tpm_burst", tpm if "tpm" in raw else base.tpm_burst, where))
    if limits.rpm_burst < limits.rpm or limits.tpm_burst < limits.tpm:
        raise ConfigError(f"{where}: a burst cannot be below its rate")
    team = raw.get("team", "")
    if not isinstance(team, str):
        raise ConfigError(f"{where}.team: a string")
    hmac_required = raw.get("hmac", False)
    if not isinstance(hmac_required, bool):
        raise ConfigError(f"{where}.hmac: true or false")
    return KeyRecord(key_id, digest, org, team, frozenset(scopes), tier_name, limits,
                     hmac_required)


def parse_keys(raw: Any, tiers: Mapping[str, Tier]) -> tuple[KeyRecord, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError("keys: expected a mapping of key id -> record")
    records = tuple(parse_key(k, v, tiers) for k, v in raw.items())
    seen: dict[str, str] = {}
    for r in records:
        if r.sha256 in seen:
            raise ConfigError(f"keys.{r.key_id}: same key as keys.{seen[r.sha256]}")
        seen[r.sha256] = r.key_id
    return records


def credential(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return x_api_key or None


def authenticate(keys: Mapping[str, KeyRecord], key: str | None, scope: str) -> KeyRecord:
    """The record of a valid key holding ``scope``; UNAUTHORIZED/INVALID_API_KEY/FORBIDDEN."""
    return authenticate_hashed(keys, None if key is None else hash_key(key), scope)


def authenticate_hashed(keys: Mapping[str, KeyRecord], digest: str | None, scope: str
                        ) -> KeyRecord:
    """``authenticate`` of the key whose SHA-256 (hex) is ``digest``: the servers hash the key
    where it arrives, so the request's context never holds the key itself."""
    if digest is None:
        raise RouterError("UNAUTHORIZED", "send an API key as 'Authorization: Bearer KEY' or "
                                          "'X-API-Key: KEY'")
    record = keys.get(digest)
    # The lookup is by hash; the comparison is constant-time all the same.
    if record is None or not hmac.compare_digest(record.sha256, digest):
        raise RouterError("INVALID_API_KEY")
    if scope not in record.scopes:
        raise RouterError("FORBIDDEN", f"this key lacks the '{scope}' scope")
    return record
