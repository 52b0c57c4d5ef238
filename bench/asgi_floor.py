"""Calibration for the real-time benchmark: the cheapest possible ASGI app on the same uvicorn.

    uvicorn bench.asgi_floor:app --loop uvloop --http httptools

It answers every request with a fixed JSON body, so its server CPU time per
request is what uvicorn + httptools + uvloop cost on this machine before any
application code runs: the floor under the scorer's own overhead.
"""

from __future__ import annotations

from typing import Any

BODY = b'{"score":0.5,"model_version":"floor","cache_hit":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
