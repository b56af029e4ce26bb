"""Reading a request body on the aiohttp path, never more than a limit (413 beyond it)."""

from __future__ import annotations

from aiohttp import web

from apirouter.errors import RouterError


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or PAYLOAD_TOO_LARGE as soon as it declares or sends more than
    ``limit`` bytes (aiohttp's own limit is lifted: the live table's applies)."""
    declared = request.content_length
    if declared is not None:
        if declared > limit:
            raise RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
        return await request.read()
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
