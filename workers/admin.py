"""The admin API, ``/v1/admin/routing/*``: read the live table; change overrides via the supervisor.

Reads answer from the worker's own table view (what this worker is routing with right now).
Writes are relayed over the supervisor's control socket: the supervisor is the only writer of
the config store, validates the change, records who made it, and publishes the new table.
Every call needs the admin bearer token (until API keys with scopes exist): its SHA-256 is
compared in constant time with the configured one; without one configured the API is off.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
from aiohttp import web

from apirouter.control_protocol import MAX_FRAME, SOCKET_NAME, CommandError, ProtocolError, call
from apirouter.errors import CATALOG, RouterError
from apirouter.keys import authenticate, credential, is_admin_token
from apirouter.redis_client import RedisUnavailable
from apirouter.stats import RUN_DIR_ENV
from apirouter.table import describe
from apirouter.validation import decode_json_object
from workers.admission import budget_usage
from workers.bodies import read_body
from workers.context import Reply
from workers.pipeline import Pipeline
from workers.scrape_metrics import key_orgs

PREFIX = "/v1/admin/routing"


class Admin:
    def __init__(self, endpoints: Pipeline) -> None:
        self.endpoints = endpoints
        self.socket = os.path.join(os.environ.get(RUN_DIR_ENV, ""), SOCKET_NAME)

    def authorize(self, request: web.Request) -> str:
        """Who is asking: the admin token, or an API key with the admin scope."""
        table = self.endpoints.tables.current().table
        expected = table.admin_token_sha256
        if not expected and not table.keys:
            raise RouterError("FORBIDDEN", "the admin API is disabled: configure "
                                           "server.admin_token_sha256 or an admin-scoped key")
        token = credential(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
        if token is None:
            raise RouterError("UNAUTHORIZED", "send the admin token or an admin key as "
                                              "'Authorization: Bearer ...'")
        if is_admin_token(token, expected):
            return "admin-token"
        record = authenticate(table.keys, token, "admin")
        return f"key {record.key_id} (org {record.org})"

    async def relay(self, cmd: str, args: dict[str, Any], request: web.Request,
                    request_id: str) -> Any:
        who = request.get("admin_actor", "admin")
        args = {**args, "actor": f"{who} from {request.remote} (request {request_id})"}
        try:
            return await call(self.socket, cmd, args, timeout=10)
        except CommandError as e:
            code = e.code if e.code in CATALOG else "INTERNAL_ERROR"
            raise RouterError(code, e.message, field=e.field) from None
        except (OSError, ProtocolError, TimeoutError):
            raise RouterError("SERVICE_UNAVAILABLE",
                              "the supervisor cannot be reached; routing continues unchanged"
                              ) from None

    # -- endpoints: (request, request_id) -> Reply ------------------------------------------

    async def table(self, request: web.Request, request_id: str) -> Reply:
        view = self.endpoints.tables.current()
        return _json({"generation": view.generation, "worker_pid": os.getpid(),
                      **describe(view.table)}, request_id)

    async def backends(self, request: web.Request, request_id: str) -> Reply:
        t = self.endpoints.tables.current().table
        return _json({"backends": [{"id": b.id, "url": b.url, "state": t.state(b.id)}
                                   for b in t.backends.values()]}, request_id)

    async def list_overrides(self, request: web.Request, request_id: str) -> Reply:
        return _json({"overrides": await self.relay("overrides.list", {}, request, request_id)},
                     request_id)

    def max_body_bytes(self) -> int:
        """Admin bodies obey the inference limit, and fit the relay to the supervisor with
        room to spare for what the relay adds (the actor)."""
        return min(self.endpoints.max_body_bytes(), MAX_FRAME // 2)

    async def set_override(self, request: web.Request, request_id: str) -> Reply:
        doc = decode_json_object(await read_body(request, self.max_body_bytes()))
        record = await self.relay("overrides.set", doc, request, request_id)
        return _json(record, request_id, status=201)

    async def clear_override(self, request: web.Request, request_id: str) -> Reply:
        result = await self.relay("overrides.clear", {"id": request.match_info["id"]}, request,
                                  request_id)
        return _json(result, request_id)

    async def audit(self, request: web.Request, request_id: str) -> Reply:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise RouterError("INVALID_REQUEST", "'limit' must be an integer",
                              field="limit") from None
        entries = await self.relay("audit.list", {"limit": limit}, request, request_id)
        return _json({"entries": entries}, request_id)

    async def budgets(self, request: web.Request, request_id: str) -> Reply:
        table = self.endpoints.tables.current().table
        wanted = request.query.get("scope")
        budgets = [b for s, b in table.budgets.items() if wanted is None or s == wanted]
        try:
            rows = await budget_usage(self.endpoints.admission, table.limits, budgets,
                                      key_orgs(table))
        except RedisUnavailable:
            raise RouterError("SERVICE_UNAVAILABLE", "the budget store (Redis) is not "
                                                     "answering") from None
        return _json({"budgets": rows}, request_id)

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("GET", f"{PREFIX}/table", self.table),
            ("GET", f"{PREFIX}/backends", self.backends),
            ("GET", f"{PREFIX}/overrides", self.list_overrides),
            ("POST", f"{PREFIX}/overrides", self.set_override),
            ("DELETE", f"{PREFIX}/overrides/{{id}}", self.clear_override),
            ("GET", f"{PREFIX}/audit", self.audit),
            ("GET", "/v1/admin/budgets", self.budgets),
        ]


def _json(doc: Any, request_id: str, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(doc), [("X-Request-ID", request_id)])
