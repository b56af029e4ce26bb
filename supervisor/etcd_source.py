"""The etcd config source: read the prefix, watch it, resync after outages.

Every change (or a reconnection) re-reads the whole prefix at one revision and hands the
decoded document to the supervisor, which validates and publishes it or rejects it. Reading
the whole prefix rather than applying events keeps the table equal to etcd's state after any
outage: nothing can be missed. A liveness probe each second notices a dead etcd even when no
watch event would ever say so; reconnection backs off up to 5 s with jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aetcd

from apirouter.config_keys import from_kv

log = logging.getLogger("apirouter.supervisor")

_ERRORS = (aetcd.ClientError, OSError, TimeoutError)


@dataclass
class Snapshot:
    raw: dict[str, Any]
    revision: int
    kvs: dict[bytes, bytes]


class EtcdSource:
    def __init__(self, endpoint: str, prefix: str,
                 on_snapshot: Callable[[Snapshot], None],
                 on_state: Callable[[], None]) -> None:
        host, _, port = endpoint.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.prefix = prefix.rstrip("/")
        self.on_snapshot = on_snapshot
        self.on_state = on_state
        self.connected = False
        self.revision = 0
        self.last_error: str | None = None
        self._client: aetcd.Client | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def _new_client(self) -> aetcd.Client:
        return aetcd.Client(host=self.host, port=self.port, timeout=2, connect_wait_timeout=2)

    async def read(self, client: aetcd.Client) -> Snapshot:
        result = await client.get_prefix(self.prefix.encode() + b"/")
        kvs = {kv.key: kv.value for kv in result.kvs}
        return Snapshot(from_kv(kvs, self.prefix), int(result.header.revision), kvs)

    async def fetch_once(self, timeout: float) -> Snapshot:
        """One read for boot: raises if etcd does not answer within ``timeout``."""
        client = self._new_client()
        try:
            async with asyncio.timeout(timeout):
                await client.connect()
                return await self.read(client)
        finally:
            await client.close()

    async def put(self, key: bytes, value: bytes) -> None:
        async with self._new_client() as client:
            await client.put(key, value)

    async def delete(self, key: bytes) -> None:
        async with self._new_client() as client:
            await client.delete(key)

    def _set(self, connected: bool, error: str | None) -> None:
        changed = (connected, error) != (self.connected, self.last_error)
        self.connected, self.last_error = connected, error
        if changed:
            self.on_state()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            client = self._new_client()
            try:
                await client.connect()
                snap = await asyncio.wait_for(self.read(client), 2)
                if snap.revision != self.revision:
                    self.revision = snap.revision
                    self.on_snapshot(snap)
                if not self.connected:
                    log.info("etcd %s connected at revision %d", self.endpoint, snap.revision)
                self._set(True, None)
                backoff = 0.1
                await self._watch(client)
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                message = f"{type(e).__name__}: {e}"[:300]
                if self.connected or self.last_error != message:
                    log.error("etcd %s unreachable (%s); retrying", self.endpoint, message)
                self._set(False, message)
            finally:
                try:
                    await client.close()
                except Exception:  # closing a broken channel may fail too; nothing to keep
                    pass
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _watch(self, client: aetcd.Client) -> None:
        prefix = self.prefix.encode() + b"/"
        while True:
            await asyncio.wait_for(client.status(), 2)  # liveness: a dead etcd raises here
            try:
                await client.watch_prefix_once(prefix, timeout=1,
                                               start_revision=self.revision + 1)
            except aetcd.WatchTimeoutError:
                continue
            snap = await asyncio.wait_for(self.read(client), 2)
            if snap.revision != self.revision:
                self.revision = snap.revision
                self.on_snapshot(snap)
