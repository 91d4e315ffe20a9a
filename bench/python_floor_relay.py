"""The floor of the gateway's Python stack, for gateway_bench's ``python-floor``
target: uvicorn (uvloop, httptools) and aiohttp relaying an engine's SSE bytes
with nothing else — no admission, accounting, failover, metrics or
validation; engines in turn. What the gateway spends above this is its own.

    python bench/python_floor_relay.py PORT ENGINE_URL[,ENGINE_URL...]
"""

from __future__ import annotations

import itertools
import sys

import aiohttp
import uvicorn


def relay_app(engine_urls: list[str]):
    engines = itertools.cycle(engine_urls)
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/readyz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        url = f"{next(engines)}/v1/chat/completions"
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            async for data in response.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


if __name__ == "__main__":
    port, urls = int(sys.argv[1]), sys.argv[2].split(",")
    uvicorn.run(relay_app(urls), host="127.0.0.1", port=port, log_level="warning", access_log=False)
