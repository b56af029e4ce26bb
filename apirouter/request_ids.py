"""Request ids: honour a sane incoming X-Request-ID, otherwise mint a cheap unique one.

A counter behind a per-process random prefix costs ~0.2 µs; uuid4 costs ~2 µs.
"""

from __future__ import annotations

import itertools
import re
import secrets

_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestIds:
    def __init__(self) -> None:
        self._prefix = "req_" + secrets.token_hex(6)
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"

    def accept(self, incoming: str | None) -> str:
        """The client's id if it is a plain token (no header injection, bounded), else a new one."""
        if incoming and _ACCEPTABLE.fullmatch(incoming):
            return incoming
        return self.new()


def valid_request_id(value: str) -> bool:
    """Whether ``value`` has the shape of a request id this router accepts or makes."""
    return _ACCEPTABLE.fullmatch(value) is not None
