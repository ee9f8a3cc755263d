"""Bad requests get a v2 error body, and a body past the limit is refused before it is read.

MLServer's REST app (FastAPI) answers a malformed JSON body with FastAPI's ``{"detail": …}``;
the v2 protocol's error body is ``{"error": "<message>"}``. `harden_app` installs a handler that
turns those into ``400 {"error": …}`` and a middleware that refuses a body over ``max_body_bytes``
with ``413 {"error": …}`` — from its ``Content-Length`` before reading it, or while streaming a
chunked one — as Triton's ``--http-max-input-size`` does.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """A streamed body went past the limit."""


class BodyLimit:
    """ASGI middleware: HTTP bodies over ``limit`` bytes get 413 and a v2 error body."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send, int(length))
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(send, seen)

    async def _refuse(self, send: Send, size: int) -> None:
        await error_response(
            send,
            413,
            f"request body of {size} bytes is over the server's limit of {self.limit} bytes "
            "(bnexport serve --max-body-mb)",
        )


async def error_response(send: Send, status: int, message: str) -> None:
    """Send ``status`` with the v2 error body ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def harden_app(app: Any, max_body_bytes: int) -> None:
    """Install the v2 error body for malformed requests and the body limit on ``app``."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def invalid_request(_request: Any, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        detail = first.get("ctx", {}).get("error") or first.get("msg", "invalid request")
        return JSONResponse(
            status_code=400,
            content={"error": f"malformed request: {first.get('msg', '')} at {where}: {detail}"},
        )

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
