"""`apirouterctl config push FILE` / `config get`: the operator's side of the etcd config store.

A push validates the YAML exactly as the supervisor will, then replaces the config sections
(server, backends, models) in one etcd transaction: one revision, so a watching supervisor
never sees half a config. Other sections under the prefix are left alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import yaml

from apirouter.config import ConfigError, parse_config
from apirouter.config_keys import config_keys, from_kv, to_kv


def _client(endpoint: str) -> aetcd.Client:
    host, _, port = endpoint.rpartition(":")
    return aetcd.Client(host=host or "127.0.0.1", port=int(port), timeout=5,
                        connect_wait_timeout=3)


async def push(endpoint: str, prefix: str, path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    parse_config(raw)  # the same validation the supervisor applies; raises ConfigError
    desired = to_kv(raw, prefix)
    async with _client(endpoint) as client:
        current = await client.get_prefix(prefix.rstrip("/").encode() + b"/")
        existing = {kv.key: kv.value for kv in current.kvs}
        stale = [k for k in config_keys(existing, prefix) if k not in desired]
        ops = [client.transactions.delete(k) for k in stale]
        ops += [client.transactions.put(k, v) for k, v in desired.items()
                if existing.get(k) != v]
        if not ops:
            return {"changed": False, "keys": len(desired)}
        await client.transaction(compare=[], success=ops, failure=[])
        revision = (await client.get_prefix(prefix.rstrip("/").encode() + b"/")).header.revision
    return {"changed": True, "written": len(ops) - len(stale), "deleted": len(stale),
            "revision": int(revision)}


async def get(endpoint: str, prefix: str) -> tuple[dict[str, Any], int]:
    async with _client(endpoint) as client:
        result = await client.get_prefix(prefix.rstrip("/").encode() + b"/")
    return from_kv({kv.key: kv.value for kv in result.kvs}, prefix), int(result.header.revision)


def run_push(endpoint: str, prefix: str, path: str) -> dict[str, Any]:
    return asyncio.run(push(endpoint, prefix, path))


def run_get(endpoint: str, prefix: str) -> tuple[dict[str, Any], int]:
    return asyncio.run(get(endpoint, prefix))
