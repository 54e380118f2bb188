"""The smallest ASGI app uvicorn can serve: the HTTP round trip alone, the limit for one request."""

from __future__ import annotations

from typing import Any

BODY = b'{"status":"ok"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


def create_app() -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "POST":  # drain the body, as a real endpoint must
            more = True
            while more:
                message = await receive()
                more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})

    return app
