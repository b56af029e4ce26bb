"""The config's key schema in etcd: one key per entity under a prefix (default ``/apirouter``).

    {prefix}/server                 {"workers": 4, "max_body_bytes": 1048576, ...}
    {prefix}/backends/{id}          {"url": "http://10.0.0.11:8000", "timeout_s": 120}
    {prefix}/models/{name}          {"backends": [{"backend": "vllm-a", "weight": 3}, ...]}
    {prefix}/tiers/{name}           {"rpm": 10000, "rpm_burst": 12000, "tpm": ..., ...}
    {prefix}/keys/{key_id}          {"sha256": "...", "org": "acme", "scopes": [...], ...}
    {prefix}/overrides/{id}         operator overrides (apirouter.overrides)

Values are JSON; names are percent-encoded (model names may contain "/"). Sections added by
later features (API keys, limit tiers, budgets, overrides) live beside these under their own
names. One key per entity lets a watch deliver small changes and lets an admin change one
entity without rewriting the rest. Pure functions: no client here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from apirouter.config import ConfigError

DEFAULT_PREFIX = "/apirouter"
# Sections `config push` owns: it replaces them wholesale and leaves any other section alone.
CONFIG_SECTIONS = ("server", "backends", "models", "tiers", "orgs", "budgets")
# Read as config too, but managed one entry at a time (apirouterctl keys create/revoke).
MANAGED_SECTIONS = ("keys",)


def _base(prefix: str) -> str:
    return prefix.rstrip("/") + "/"


def to_kv(raw: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> dict[bytes, bytes]:
    """A config document (as decoded from YAML) as etcd keys and values."""
    base = _base(prefix)
    kv: dict[bytes, bytes] = {}
    if raw.get("server"):
        kv[f"{base}server".encode()] = json.dumps(raw["server"], sort_keys=True).encode()
    for section in ("backends", "models", "tiers", "orgs", "budgets", "keys"):
        for name, value in (raw.get(section) or {}).items():
            key = f"{base}{section}/{quote(str(name), safe='')}"
            kv[key.encode()] = json.dumps(value, sort_keys=True).encode()
    return kv


def from_kv(kvs: Mapping[bytes, bytes], prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The config document stored under ``prefix``; unknown config keys are a ConfigError."""
    base = _base(prefix).encode()
    raw: dict[str, Any] = {}
    for key, value in sorted(kvs.items()):
        if not key.startswith(base):
            continue
        rel = key[len(base):].decode("utf-8", "replace")
        section, _, name = rel.partition("/")
        if section not in CONFIG_SECTIONS and section not in MANAGED_SECTIONS:
            continue  # another feature's section
        try:
            doc = json.loads(value)
        except ValueError:
            raise ConfigError(f"etcd key {key.decode('utf-8', 'replace')}: not JSON") from None
        if section == "server":
            if name:
                raise ConfigError(f"etcd key {key.decode()}: unexpected key under server")
            raw["server"] = doc
        else:
            if not name:
                raise ConfigError(f"etcd key {key.decode()}: missing a name")
            raw.setdefault(section, {})[unquote(name)] = doc
    return raw


def config_keys(kvs: Mapping[bytes, bytes], prefix: str = DEFAULT_PREFIX) -> list[bytes]:
    """The keys of the sections `config push` owns (to delete what a new push drops)."""
    base = _base(prefix)
    owned = tuple(f"{base}{s}".encode() for s in CONFIG_SECTIONS)
    return [k for k in kvs if k.startswith(owned)]
