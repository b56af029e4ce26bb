"""The supervisor's control socket: apirouterctl and the workers' admin relay talk to it.

Handlers return JSON-able results or raise CommandError; the server frames replies
(apirouter.control_protocol). The socket file is created mode 0600 in the run directory, so
only the router's own user (and root) can steer it; the peer's uid is recorded as the actor
unless a worker relays an authenticated admin request with its own actor string.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from apirouter.config import ConfigError
from apirouter.control_protocol import (
    SOCKET_NAME,
    CommandError,
    ProtocolError,
    encode,
    read_frame,
)
from apirouter.errors import RouterError
from apirouter.keys import hash_key, new_key, parse_key
from apirouter.overrides import new_record
from apirouter.table import compile_table, describe

if TYPE_CHECKING:
    from supervisor.main import Supervisor

log = logging.getLogger("apirouter.supervisor")
Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


class ControlServer:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.path = os.path.join(sup.opts.run_dir, SOCKET_NAME)
        self.server: asyncio.AbstractServer | None = None
        self.handlers: dict[str, Handler] = {
            "status": self.status,
            "dump": self.dump,
            "reload": self.reload,
            "scale": self.scale,
            "stop": self.stop,
            "overrides.list": self.list_overrides,
            "overrides.set": self.set_override,
            "overrides.clear": self.clear_override,
            "audit.list": self.audit,
            "keys.create": self.create_key,
            "keys.list": self.list_keys,
            "keys.revoke": self.revoke_key,
            "usage": self.usage,
        }

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        try:
            request = await asyncio.wait_for(read_frame(reader), 10)
            cmd = request.get("cmd") if isinstance(request, dict) else None
            args = request.get("args") or {} if isinstance(request, dict) else {}
            handler = self.handlers.get(cmd) if isinstance(cmd, str) else None
            if handler is None or not isinstance(args, dict):
                raise CommandError("INVALID_REQUEST", f"unknown command {cmd!r}")
            actor = str(args.pop("actor", "")) or peer
            reply: dict[str, Any] = {"ok": True, "result": await handler(args, actor)}
        except CommandError as e:
            reply = {"ok": False, "error": {"code": e.code, "message": e.message}}
        except RouterError as e:
            reply = {"ok": False, "error": {"code": e.code, "message": e.message,
                                            "field": e.field}}
        except (ProtocolError, asyncio.IncompleteReadError, TimeoutError) as e:
            reply = {"ok": False, "error": {"code": "INVALID_REQUEST", "message": str(e)}}
        except Exception:
            log.exception("control command failed")
            reply = {"ok": False, "error": {"code": "INTERNAL_ERROR", "message": "see the log"}}
        try:
            writer.write(encode(reply))
            await writer.drain()
        finally:
            writer.close()

    # -- commands ------------------------------------------------------------------------------

    async def usage(self, args: dict[str, Any], actor: str) -> Any:
        """Usage export state; ``replay``: reconnect to Kafka and replay the spool now."""
        if self.sup.usage is None:
            raise CommandError("SERVICE_UNAVAILABLE", "usage export is not running yet")
        if args.get("replay"):
            log.info("spool replay requested by %s", actor)
            self.sup.usage.sink.replay_now()
        return self.sup.usage.state()

    async def status(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        assert sup.cfg is not None and sup.publisher is not None
        return {
            "supervisor_pid": os.getpid(),
            "gunicorn_pid": sup.pool.pid if sup.pool else None,
            "worker_pids": sup.monitor.live_workers,
            "bind": sup.cfg.server.bind,
            "table_generation": sup.publisher.generation,
            "source": sup.source,
            "config_store": sup.config_status(),
            "backends": {b.id: sup.monitor.states().get(b.id, "healthy")
                         for b in sup.cfg.backends},
            "models": sorted(m.name for m in sup.cfg.models),
            "overrides": len(sup.active_overrides()),
            "reload_failures": sup.reload_failures,
            "uptime_s": round(time.time() - sup.started_at, 1),
        }

    async def dump(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        assert sup.cfg is not None and sup.publisher is not None
        table = compile_table(sup.cfg, source=sup.source, health=sup.monitor.states(),
                              indices=sup.indices, overrides=sup.override_objects())
        return {"generation": sup.publisher.generation, **describe(table)}

    async def reload(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        before = sup.reload_failures
        log.info("reload requested by %s", actor)
        await sup.reload_now()
        if sup.reload_failures > before:
            reason = (sup.rejected or {}).get("reason", "see the log")
            raise CommandError("INVALID_REQUEST", f"reload rejected, the running config "
                                                  f"stays: {reason}")
        assert sup.publisher is not None
        return {"reloaded": True, "generation": sup.publisher.generation}

    async def scale(self, args: dict[str, Any], actor: str) -> Any:
        delta = args.get("delta")
        if not isinstance(delta, int) or isinstance(delta, bool) or delta == 0:
            raise CommandError("INVALID_REQUEST", "'delta' must be a non-zero integer")
        log.info("scale %+d requested by %s", delta, actor)
        for _ in range(abs(delta)):
            self.sup.signals.put_nowait(signal.SIGTTIN if delta > 0 else signal.SIGTTOU)
        return {"signalled": delta}

    async def stop(self, args: dict[str, Any], actor: str) -> Any:
        log.info("stop requested by %s", actor)
        self.sup.signals.put_nowait(signal.SIGTERM)
        return {"stopping": True}

    async def list_overrides(self, args: dict[str, Any], actor: str) -> Any:
        return sorted(self.sup.active_overrides().values(), key=lambda r: r["created_at"])

    async def set_override(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        assert sup.cfg is not None
        record = new_record(args, sup.cfg, actor)
        await sup.overrides.add(record["id"], record, actor, "override.set")
        sup.overrides_changed()
        return record

    async def clear_override(self, args: dict[str, Any], actor: str) -> Any:
        override_id = args.get("id")
        if not isinstance(override_id, str) or not await self.sup.overrides.remove(
                override_id, actor, "override.clear"):
            raise CommandError("NOT_FOUND", f"no override {override_id!r}")
        self.sup.overrides_changed()
        return {"cleared": override_id}

    async def audit(self, args: dict[str, Any], actor: str) -> Any:
        limit = args.get("limit", 100)
        return self.sup.overrides.recent_audit(limit if isinstance(limit, int) else 100)

    # -- API keys ------------------------------------------------------------------------------

    async def create_key(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        assert sup.cfg is not None
        key_id, key = new_key()
        record = {"sha256": hash_key(key), "org": args.get("org"),
                  "team": args.get("team") or "", "scopes": args.get("scopes") or ["inference"],
                  "tier": args.get("tier") or "developer", "hmac": bool(args.get("hmac")),
                  "created_at": time.time(), "created_by": actor}
        try:
            parse_key(key_id, record, sup.cfg.tiers)
        except ConfigError as e:
            raise CommandError("INVALID_REQUEST", str(e)) from None
        await sup.keys.add(key_id, record, actor, "key.create")
        sup.keys_changed()
        shown = {k: v for k, v in record.items() if k != "sha256"}
        return {"key_id": key_id, "key": key, **shown,
                "note": "store the key now: it is not kept and cannot be shown again"}

    async def list_keys(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        assert sup.cfg is not None
        return [{"key_id": k.key_id, "org": k.org, "team": k.team, "scopes": sorted(k.scopes),
                 "tier": k.tier, "hmac": k.hmac_required,
                 "managed": k.key_id in sup.keys.records} for k in sup.cfg.keys]

    async def revoke_key(self, args: dict[str, Any], actor: str) -> Any:
        sup = self.sup
        key_id = args.get("key_id")
        if not isinstance(key_id, str):
            raise CommandError("INVALID_REQUEST", "'key_id' is required")
        if not await sup.keys.remove(key_id, actor, "key.revoke"):
            if sup.cfg is not None and any(k.key_id == key_id for k in sup.cfg.keys):
                raise CommandError("INVALID_REQUEST", f"key {key_id} is defined in the config "
                                                      "file: remove it there and reload")
            raise CommandError("NOT_FOUND", f"no key {key_id!r}")
        sup.keys_changed()
        return {"revoked": key_id}


def _peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        return f"uid:{uid} pid:{pid}"
    except (OSError, AttributeError):
        return "unknown peer"
