"""Types of the lean server's C part (apirouter/_httpcore.c, see workers/fast_server.py)."""

from typing import Any, Literal

def take_request(data: bytes, start: int, view: Any, routes: dict[tuple[bytes, bytes], Any],
                 max_body: int, signing: bool, tracing: bool,
                 /) -> tuple[Any, ...] | Literal[False] | None: ...
def response_head(status_lines: dict[int, bytes], status: int, date: bytes, content_type: str,
                  framing: int, headers: list[tuple[str, str]], keep_alive: bool, body: bytes,
                  /) -> bytes: ...
