"""The one error catalog: every error a client can see, and how it is rendered.

Each code has a fixed HTTP status, a numeric code in its category's range (seed 004), and says
whether a client may retry. Two renderings exist: the native envelope (``error`` + ``meta``)
and OpenAI's error shape, so the official SDKs raise the matching exception class.

Ranges: 1000 authentication, 1100 authorization, 1200 validation, 1300 not found,
1400 conflict, 1500 rate limit and quota, 1600 dependency (our own stores), 1700 backend,
1800 timeout, 1900 internal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

# Anchors into the generated catalog shipped with the project (docs/errors.md).
DOCS_BASE_URL = "docs/errors.md"


class Category(StrEnum):
    AUTHENTICATION = "AUTHENTICATION"
    AUTHORIZATION = "AUTHORIZATION"
    VALIDATION = "VALIDATION"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    RATE_LIMIT = "RATE_LIMIT"
    DEPENDENCY = "DEPENDENCY"
    BACKEND = "BACKEND"
    TIMEOUT = "TIMEOUT"
    INTERNAL = "INTERNAL"


CATEGORY_RANGES: dict[Category, range] = {
    Category.AUTHENTICATION: range(1000, 1100),
    Category.AUTHORIZATION: range(1100, 1200),
    Category.VALIDATION: range(1200, 1300),
    Category.NOT_FOUND: range(1300, 1400),
    Category.CONFLICT: range(1400, 1500),
    Category.RATE_LIMIT: range(1500, 1600),
    Category.DEPENDENCY: range(1600, 1700),
    Category.BACKEND: range(1700, 1800),
    Category.TIMEOUT: range(1800, 1900),
    Category.INTERNAL: range(1900, 2000),
}

# OpenAI's error "type" per category: the SDKs key their exception on the HTTP status,
# and clients that inspect the body look at type and code.
_OPENAI_TYPE: dict[Category, str] = {
    Category.AUTHENTICATION: "authentication_error",
    Category.AUTHORIZATION: "permission_error",
    Category.VALIDATION: "invalid_request_error",
    Category.NOT_FOUND: "invalid_request_error",
    Category.CONFLICT: "invalid_request_error",
    Category.RATE_LIMIT: "rate_limit_error",
    Category.DEPENDENCY: "api_error",
    Category.BACKEND: "api_error",
    Category.TIMEOUT: "api_error",
    Category.INTERNAL: "api_error",
}


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    name: str
    number: int
    status: int
    category: Category
    retriable: bool
    default_message: str

    @property
    def documentation_url(self) -> str:
        return f"{DOCS_BASE_URL}#{self.number}"


def _spec(name: str, number: int, status: int, category: Category, retriable: bool,
          message: str) -> ErrorSpec:
    return ErrorSpec(name, number, status, category, retriable, message)


C = Category
CATALOG: dict[str, ErrorSpec] = {s.name: s for s in (
    _spec("UNAUTHORIZED", 1000, 401, C.AUTHENTICATION, False, "authentication is required"),
    _spec("INVALID_API_KEY", 1001, 401, C.AUTHENTICATION, False, "the API key is not valid"),
    _spec("FORBIDDEN", 1100, 403, C.AUTHORIZATION, False,
          "the credential lacks the scope this endpoint needs"),
    _spec("INVALID_REQUEST", 1200, 400, C.VALIDATION, False, "the request is not valid"),
    _spec("MISSING_FIELD", 1201, 400, C.VALIDATION, False, "a required field is missing"),
    _spec("PAYLOAD_TOO_LARGE", 1202, 413, C.VALIDATION, False,
          "the request body exceeds the size limit"),
    _spec("METHOD_NOT_ALLOWED", 1203, 405, C.VALIDATION, False,
          "the method is not allowed on this path"),
    _spec("CLIENT_DISCONNECTED", 1204, 499, C.VALIDATION, False,
          "the client closed the connection before the response was complete"),
    _spec("NOT_FOUND", 1300, 404, C.NOT_FOUND, False, "no such endpoint"),
    _spec("REQUEST_NOT_FOUND", 1301, 404, C.NOT_FOUND, False, "no record of that request id"),
    _spec("MODEL_NOT_FOUND", 1302, 404, C.NOT_FOUND, False, "the model is not routed here"),
    _spec("RATE_LIMIT_EXCEEDED", 1500, 429, C.RATE_LIMIT, True, "rate limit exceeded"),
    _spec("BUDGET_EXCEEDED", 1550, 402, C.RATE_LIMIT, False, "the spend budget is exhausted"),
    _spec("QUOTA_EXCEEDED", 1551, 402, C.RATE_LIMIT, False, "the usage quota is exhausted"),
    _spec("SERVICE_UNAVAILABLE", 1600, 503, C.DEPENDENCY, True,
          "the router cannot serve requests right now"),
    _spec("BACKEND_ERROR", 1700, 502, C.BACKEND, True,
          "the backend failed to produce a valid response"),
    _spec("BACKEND_UNAVAILABLE", 1701, 503, C.BACKEND, True, "the backend could not be reached"),
    _spec("NO_BACKEND_AVAILABLE", 1702, 503, C.BACKEND, True,
          "no healthy backend serves this model"),
    _spec("STREAM_INTERRUPTED", 1703, 502, C.BACKEND, True,
          "the backend's stream broke off after it had started (cut, stalled or unterminated)"),
    _spec("BACKEND_TIMEOUT", 1800, 504, C.TIMEOUT, True,
          "the backend did not answer before the deadline"),
    _spec("REQUEST_TIMEOUT", 1801, 408, C.TIMEOUT, True,
          "the request was not received in time"),
    _spec("INTERNAL_ERROR", 1900, 500, C.INTERNAL, True, "internal error"),
    _spec("ROUTING_ERROR", 1901, 500, C.INTERNAL, True, "the request could not be routed"),
)}
del C


class RouterError(Exception):
    """An error a client will see. Raised on error paths only, rendered once at the edge."""

    __slots__ = ("spec", "message", "field", "details", "headers")

    def __init__(self, code: str, message: str | None = None, *, field: str | None = None,
                 details: str | None = None, headers: dict[str, str] | None = None) -> None:
        spec = CATALOG[code]
        self.spec = spec
        self.message = message or spec.default_message
        self.field = field
        self.details = details
        self.headers = headers
        super().__init__(f"{code}: {self.message}")

    @property
    def code(self) -> str:
        return self.spec.name

    @property
    def status(self) -> int:
        return self.spec.status


def _timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def native_body(err: RouterError, request_id: str) -> bytes:
    """The seed-004 envelope: ``{"error": {...}, "meta": {...}}``."""
    spec = err.spec
    error: dict[str, Any] = {
        "code": spec.number,
        "error_code": spec.name,
        "category": spec.category.value,
        "message": err.message,
        "retriable": spec.retriable,
    }
    if err.details is not None:
        error["details"] = err.details
    if err.field is not None:
        error["field"] = err.field
    return orjson.dumps({
        "error": error,
        "meta": {
            "timestamp": _timestamp(),
            "request_id": request_id,
            "documentation_url": spec.documentation_url,
        },
    })


def openai_body(err: RouterError, request_id: str) -> bytes:
    """OpenAI's error shape, with our code and request id alongside for correlation."""
    spec = err.spec
    message = err.message if err.details is None else f"{err.message} ({err.details})"
    return orjson.dumps({
        "error": {
            "message": message,
            "type": _OPENAI_TYPE[spec.category],
            "param": err.field,
            "code": spec.name.lower(),
            "request_id": request_id,
        }
    })
