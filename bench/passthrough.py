"""The bare pass-through floor: what anyone would write in ~30 lines.

Forwards POST /v1/chat/completions (JSON or SSE, streamed through as it
arrives) to an upstream with one shared aiohttp session. No tricks.

    python bench/passthrough.py --upstream http://127.0.0.1:9000/v1 --port 9100 [--client lean]

``--client lean``: the same forwarding as a pure ASGI app over abproxy's own upstream client
(``abproxy.upstream.client``), i.e. abproxy with no experiment, no recording, no metrics. The
difference between it and abproxy is what abproxy's own work costs.
"""

import argparse
import contextlib

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = "http://127.0.0.1:9000/v1"
session: aiohttp.ClientSession | None = None


@contextlib.asynccontextmanager
async def lifespan(app):
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await session.close()


async def chat(request: Request):
    body = await request.body()
    headers = {"Content-Type": "application/json"}
    if "authorization" in request.headers:
        headers["Authorization"] = request.headers["authorization"]
    resp = await session.post(UPSTREAM + "/chat/completions", data=body, headers=headers)
    ctype = resp.headers.get("Content-Type", "application/json")
    if ctype.startswith("text/event-stream"):
        async def gen():
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return StreamingResponse(gen(), status_code=resp.status, media_type=ctype)
    data = await resp.read()
    resp.release()
    return Response(data, status_code=resp.status, media_type=ctype)


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def lean_app(upstream: str):
    from abproxy.upstream.client import OriginSettings, UpstreamClient

    client = UpstreamClient({"up": OriginSettings(upstream, "", 10.0)})
    forwarded = (b"content-type", b"authorization")

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k in forwarded]
        async with client.request("up", "POST", "/chat/completions", b"", headers, body, 300.0, True) as resp:
            out = [(b"content-type", resp.content_type.encode() or b"application/json")]
            if resp.content_type == "text/event-stream":
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                async for chunk in resp:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                data = await resp.read()
                out.append((b"content-length", b"%d" % len(data)))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": data})

    return asgi

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", default=UPSTREAM)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--client", choices=("aiohttp", "lean"), default="aiohttp")
    args = ap.parse_args()
    UPSTREAM = args.upstream.rstrip("/")
    uvicorn.run(app if args.client == "aiohttp" else lean_app(UPSTREAM), host=args.host, port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
