"""What a backend's HTTP status means for the client: pure, shared by every endpoint."""

from __future__ import annotations

# Statuses that say the *client's* request was at fault; OpenAI-compatible endpoints pass
# these through unchanged so SDK users see the backend's own explanation.
_CLIENT_FAULT = frozenset({400, 404, 409, 413, 415, 422})


def backend_error_code(status: int) -> str | None:
    """The catalog code for a backend status, or None when the response is passed on as is."""
    if status < 400 or status in _CLIENT_FAULT:
        return None
    if status in (429, 503):
        return "BACKEND_UNAVAILABLE"
    if status == 504:
        return "BACKEND_TIMEOUT"
    return "BACKEND_ERROR"


# Statuses worth another backend: the backend is failing or overloaded, not the request.
_FAILOVER = frozenset({429, 500, 502, 503, 504})


def should_failover(status: int) -> bool:
    return status in _FAILOVER
