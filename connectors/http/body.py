"""Request bodies with a size limit, whether announced (Content-Length) or chunked."""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The body is (or would be) larger than the endpoint takes: answered 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def check_declared_length(request: web.Request, limit: int) -> None:
    """Refuse before reading anything when Content-Length already says too much."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, or BodyTooLarge as soon as it passes `limit` (chunked senders
    announce no length, so the count is kept while reading)."""
    check_declared_length(request, limit)
    data = bytearray()
    while chunk := await request.content.read(1 << 16):
        data.extend(chunk)
        if len(data) > limit:
            raise BodyTooLarge(limit)
    return bytes(data)
