"""Request bodies on the aiohttp path: never read more than the limit (413 beyond it), and
``Expect: 100-continue`` answered accordingly."""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from apirouter.errors import RouterError


def body_refused(request: web.Request, limit: int) -> RouterError | None:
    """PAYLOAD_TOO_LARGE when the request declares a body over ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
    return None


async def continue_expected(request: web.Request) -> None:
    """Send the 100 Continue an HTTP/1.1 client waits for before its body (other
    expectations are ignored, as RFC 9110 10.1.1 allows)."""
    if (request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or PAYLOAD_TOO_LARGE as soon as it declares or sends more than
    ``limit`` bytes (aiohttp's own limit is lifted: the live table's applies)."""
    refused = body_refused(request, limit)
    if refused is not None:
        raise refused
    if request.content_length is not None:
        return await request.read()
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise RouterError("PAYLOAD_TOO_LARGE", details=f"the limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
