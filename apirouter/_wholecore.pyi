"""Types of the C part of workers/upstream.py's fast path (apirouter/_wholecore.c)."""

from typing import TypeVar

_R = TypeVar("_R")

def whole_response(read: bytes, max_body: int, cls: type[_R], /) -> _R | None: ...
