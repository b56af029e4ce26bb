"""The one outcome classifier: what a backend's answer (or failure) means for every endpoint.

Pure and shared by every endpoint and both response modes, so that a backend 400 is the same
thing on /v1/chat/completions and /v1/inference: the client's fault, not a success, not the
backend's fault, and its reservation released. One Outcome decides

- ``success``: counted as a success (``router_requests_total{success}``);
- ``failover``: worth trying another backend — only while nothing reached the client;
- ``backend_fault``: counts against the backend (passive outlier detection, stats segment);
- ``settle_actual``: settle the reservation to the usage produced (else release it);
- ``error_code``: the catalog code the request ends with (None for a success);
- ``passthrough``: an OpenAI-family client gets the backend's own error body unchanged (the
  SDKs then show the backend's explanation); native clients get the catalog error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outcome:
    success: bool
    failover: bool
    backend_fault: bool
    settle_actual: bool
    error_code: str | None
    passthrough: bool = False


SUCCESS = Outcome(True, False, False, True, None)
# The client's request was at fault (the backend says so): passed through, released.
CLIENT_FAULT = Outcome(False, False, False, False, "INVALID_REQUEST", passthrough=True)
# A stream that broke after its first byte: no failover any more; what was produced is billed.
INTERRUPTED = Outcome(False, False, True, True, "STREAM_INTERRUPTED")
# The client went away: not the backend's fault; what was produced is billed.
CLIENT_GONE = Outcome(False, False, False, True, "CLIENT_DISCONNECTED")

# Statuses that say the *client's* request was at fault.
_CLIENT_FAULT = frozenset({400, 404, 409, 413, 415, 422})
# Statuses worth another backend: the backend is failing or overloaded, not the request.
_FAILOVER = frozenset({429, 500, 502, 503, 504})


def backend_error_code(status: int) -> str | None:
    """The catalog code for a backend status; None for a success."""
    if 200 <= status < 300:
        return None
    if status in _CLIENT_FAULT:
        return "INVALID_REQUEST"
    if status in (429, 503):
        return "BACKEND_UNAVAILABLE"
    if status == 504:
        return "BACKEND_TIMEOUT"
    return "BACKEND_ERROR"


def should_failover(status: int) -> bool:
    return status in _FAILOVER


def _for_status(status: int) -> Outcome:
    if 200 <= status < 300:
        return SUCCESS
    if status in _CLIENT_FAULT:
        return CLIENT_FAULT
    code = backend_error_code(status)
    # 429 is overload, not a broken backend: fail over, but do not eject it for it.
    return Outcome(False, status in _FAILOVER, status >= 500, False, code)


# Every status a backend may send, classified once (forwarding reads it inline: a call less).
OUTCOME_BY_STATUS = {s: _for_status(s) for s in range(100, 600)}


def classify_status(status: int) -> Outcome:
    """The outcome of a complete backend response with this HTTP status."""
    got = OUTCOME_BY_STATUS.get(status)
    return got if got is not None else _for_status(status)


# Transport failures before any response (connect error, timeout, broken HTTP): the request
# never produced anything, so every one fails over and counts against the backend.
_TRANSPORT = {code: Outcome(False, True, True, False, code)
              for code in ("BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT", "BACKEND_ERROR")}


def classify_failure(code: str) -> Outcome:
    """The outcome of an attempt that failed without a usable response, by catalog code."""
    got = _TRANSPORT.get(code)
    return got if got is not None else Outcome(False, False, True, False, code)
