"""``GET /v1/audit/requests/{requestId}``: a request's usage record, for its owner.

Who may read: the admin token or an admin-scoped key reads any record; a key with the
``audit`` scope reads the records of its own org (another org's record is answered 404, as if
it did not exist, so ids cannot be probed). ``?fields=a,b`` selects top-level fields, checked
against the usage record schema. Responses carry a strong ETag over the body sent and
Last-Modified (the request's end); If-None-Match / If-Modified-Since answer 304.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from apirouter.audit import etag, http_date, not_modified
from apirouter.errors import RouterError
from apirouter.keys import authenticate, credential, is_admin_token
from apirouter.request_ids import valid_request_id
from apirouter.usage import parse_fields, select
from workers.audit_reader import AuditReader
from workers.context import Reply
from workers.metrics import AUDIT_LOOKUPS
from workers.pipeline import Pipeline

PATH = "/v1/audit/requests/{request_id}"


class AuditApi:
    def __init__(self, endpoints: Pipeline, reader: AuditReader | None) -> None:
        self.endpoints = endpoints
        self.reader = reader

    def _readable_org(self, request: web.Request) -> tuple[bool, str | None]:
        """(may read every org, else the one org it may read)."""
        table = self.endpoints.tables.current().table
        if not table.auth_required:
            return True, None
        token = credential(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
        if is_admin_token(token, table.admin_token_sha256):
            return True, None
        try:
            key = authenticate(table.keys, token, "audit")
        except RouterError as e:
            if e.code != "FORBIDDEN":
                raise
            authenticate(table.keys, token, "admin")  # FORBIDDEN again names 'admin'
            return True, None
        return False, key.org

    async def lookup(self, request: web.Request, request_id: str) -> Reply:
        all_orgs, org = self._readable_org(request)
        wanted = request.match_info["request_id"]
        fields = parse_fields(request.query.get("fields"))
        if not valid_request_id(wanted):
            raise RouterError("INVALID_REQUEST", "requestId: 1-128 characters of letters, "
                                                 "digits and . _ : -", field="requestId")
        if self.reader is None:
            raise RouterError("SERVICE_UNAVAILABLE", "no audit store is configured")
        raw = await self.reader.get(wanted, None if all_orgs else (org or ""))
        record = orjson.loads(raw) if raw is not None else None
        if record is None or not (all_orgs or record.get("org") == org):
            AUDIT_LOOKUPS.labels("not_found").inc()
            raise RouterError("REQUEST_NOT_FOUND", f"no record of request {wanted}")
        body = orjson.dumps(select(record, fields))
        tag = etag(body)
        modified = float(record.get("ts_end") or 0)
        headers = [("X-Request-ID", request_id), ("ETag", tag),
                   ("Last-Modified", http_date(modified)),
                   ("Cache-Control", "private, max-age=60"), ("Vary", "Authorization")]
        if not_modified(request.headers.get("If-None-Match"),
                        request.headers.get("If-Modified-Since"), tag, modified):
            AUDIT_LOOKUPS.labels("not_modified").inc()
            return Reply(304, b"", headers)
        AUDIT_LOOKUPS.labels("found").inc()
        return Reply(200, body, headers)
