"""The control socket's wire format: length-prefixed JSON frames over a unix socket.

    frame   = length (u32, big endian) + UTF-8 JSON
    request = {"cmd": "status" | "reload" | ..., "args": {...}}
    reply   = {"ok": true, "result": ...} | {"ok": false, "error": {"code": ..., "message": ...}}

Shared by the supervisor's server, apirouterctl and the workers' admin relay. Frames are
capped so a confused peer cannot make either side allocate without bound.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

MAX_FRAME = 1 << 20
SOCKET_NAME = "control.sock"
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


class CommandError(Exception):
    """A command failed; carries a catalog code for the caller to render."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def encode(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_LEN.size)
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    try:
        return json.loads(await reader.readexactly(length))
    except ValueError:
        raise ProtocolError("frame is not JSON") from None


async def call(path: str, cmd: str, args: dict[str, Any] | None = None,
               timeout: float = 30.0) -> Any:
    """Send one command; return its result or raise CommandError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(encode({"cmd": cmd, "args": args or {}}))
            await writer.drain()
            reply = await read_frame(reader)
        finally:
            writer.close()
    if not isinstance(reply, dict):
        raise ProtocolError("reply is not an object")
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    field = err.get("field")
    raise CommandError(str(err.get("code", "INTERNAL_ERROR")), str(err.get("message", "")),
                       field if isinstance(field, str) else None)
