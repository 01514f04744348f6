"""The local web chat: a starlette app over one `ChatSession`, served by uvicorn.

Endpoints (all fixed; none takes a path): `/`, `/app.js`, `/style.css` (the page,
shipped as package data), `GET /api/info`, `POST /api/reply` (streams a reply as
server-sent events), `POST /api/rate`, `POST /api/undo`, `GET /api/ratings`.
The page keeps the conversation (in sessionStorage, so a reload keeps it) and sends
it with each turn; the server keeps every
reply it generated, so a rating can only name a reply this server produced (a page
cannot write arbitrary text into the feedback file).

Every refusal is a 4xx with a JSON `{"error": ...}`; what a request may hold is
checked in `inputs` (body size and JSON, each field's type, the conversation).

Guard (`LocalOnly`): requests whose Host is not `localhost` or an IP literal with our
port get 403 (a DNS-rebinding page reaches us under its own domain name), and so do
requests whose Origin is not this page's own (cross-site POSTs; every POST must
carry Origin, which browsers always send on POST).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
from importlib import resources

from mlx_kto.collect.session import ChatSession
from mlx_kto.collect.web.inputs import (
    BadRequest,
    conversation,
    display_rating,
    fields,
    read_json,
)
from mlx_kto.collect.worker import StopFlag
from mlx_kto.data.feedback import append_row, read_ratings, retraction_row
from mlx_kto.errors import UserError

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'"


def _host_ok(host: str | None, port: int) -> bool:
    if not host:
        return False
    name, sep, p = host.rpartition(":")
    if not sep or p != str(port):
        return False
    name = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)  # an IP literal cannot be rebound by DNS
        return True
    except ValueError:
        return False


class LocalOnly:
    """ASGI middleware: 403 unless Host (and Origin, when sent; always for POST) is
    this server's own address."""

    def __init__(self, app, port: int):
        self.app, self.port = app, port

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            host, origin = headers.get("host"), headers.get("origin")
            why = None
            if not _host_ok(host, self.port):
                why = "Host is not this local server"
            elif origin is not None and origin != f"http://{host}":
                why = "Origin is not this page"
            elif origin is None and scope["method"] not in ("GET", "HEAD"):
                why = "a POST must come from this page (no Origin header)"
            elif headers.get("sec-fetch-site") == "cross-site":
                why = "cross-site request"
            if why:
                body = json.dumps({"error": f"forbidden: {why}"}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: every refusal as a 4xx with a JSON error."""
    if isinstance(exc, BadRequest):
        return _error(exc.status, str(exc))
    if isinstance(exc, UserError):  # the feedback file (a line of it, its folder, the disk)
        return _error(409, str(exc))
    assert isinstance(exc, HTTPException)  # 404 / 405 from the router
    return _error(exc.status_code, exc.detail)


def create_app(session: ChatSession, port: int):
    """The starlette app for `session`; `port` is the one the guard accepts in Host."""
    gen_lock = asyncio.Lock()  # one generation at a time: one model, one CPU/GPU
    streaming: set[StopFlag] = set()  # the stop flags of replies in flight
    system = [m for m in session.messages if m["role"] == "system"]
    pages = {
        route: (resources.files("mlx_kto.collect.web").joinpath("static", name).read_bytes(), kind)
        for route, (name, kind) in STATIC.items()
    }

    async def page(request: Request):
        body, kind = pages[request.url.path]
        return Response(
            body,
            media_type=kind,
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
        )

    async def info(request: Request):
        return JSONResponse(
            {
                "model": session.model_name,
                "adapter": session.adapter_path,
                "feedback": str(session.feedback),
                "sampling": session.meta()["sampling"],
                "system_prompt": system[0]["content"] if system else None,
            }
        )

    async def reply(request: Request):
        prompt = system + conversation(fields(await read_json(request), "reply")["messages"])
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = StopFlag()  # also set by the Ctrl-C handler: no lock (collect/worker.py)

        def emit(kind, value):  # on the MLX thread: hand over to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        async def events():
            async with gen_lock:
                streaming.add(stop)
                session.start_stream(prompt, stop, emit)  # all MLX work on its thread
                pieces: list[str] = []
                try:
                    while True:
                        kind, value = await queue.get()
                        if kind == "piece":
                            pieces.append(value)
                            yield f"event: token\ndata: {json.dumps({'text': value})}\n\n"
                        elif kind == "error":
                            err = f"{type(value).__name__}: {value}"
                            yield f"event: error\ndata: {json.dumps({'error': err})}\n\n"
                            return
                        else:
                            r = session.new_reply(prompt, "".join(pieces))
                            yield f"event: done\ndata: {json.dumps({'id': r.id, 'text': r.text})}\n\n"
                            return
                finally:
                    stop.set()
                    streaming.discard(stop)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def rate(request: Request):
        data = fields(await read_json(request), "rate")
        r = session.replies.get(data["reply_id"])
        if r is None:
            return _error(404, "no such reply (only replies from this server can be rated)")
        try:
            rid = await asyncio.to_thread(session.rate, r, data["label"])  # fsync off the loop
        except UserError as e:  # an empty reply; the file not writable
            return _error(400, str(e))
        return JSONResponse({"rating_id": rid, "label": r.label})

    async def undo(request: Request):
        rid = fields(await read_json(request), "undo")["rating_id"]
        live = await asyncio.to_thread(read_ratings, session.feedback)
        if rid not in {row.get("id") for row in live if isinstance(row.get("id"), str)}:
            return _error(404, "no such rating in the feedback file")
        mine = next((r for r in session.replies.values() if r.rating_id == rid), None)
        if mine is not None:
            await asyncio.to_thread(session.undo, mine)
        else:
            await asyncio.to_thread(append_row, session.feedback, retraction_row(rid))
        return JSONResponse({"retracted": rid, "reply_id": mine.id if mine else None})

    async def ratings(request: Request):
        rows = await asyncio.to_thread(read_ratings, session.feedback)
        out = [display_rating(row) for row in reversed(rows[-500:])]
        return JSONResponse({"feedback": str(session.feedback), "ratings": out})

    routes = [Route(path, page, methods=["GET"]) for path in STATIC]
    routes += [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/reply", reply, methods=["POST"]),
        Route("/api/rate", rate, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/ratings", ratings, methods=["GET"]),
    ]
    handlers = {BadRequest: _refused, UserError: _refused, HTTPException: _refused}
    app = LocalOnly(Starlette(routes=routes, exception_handlers=handlers), port)
    app.stop_streams = lambda: [stop.set() for stop in list(streaming)]
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free one), so the URL is known before serving."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UserError(f"port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(64)
    return sock


def _exit_on_second_ctrl_c() -> None:
    """SIGINT for the rest of the process, outside uvicorn's own handler: the first raises
    KeyboardInterrupt (as Python's default does; uvicorn re-raises the Ctrl-C it stopped on),
    any later one ends the process at once with 130. Every rating is on disk already, and
    Ctrl-C held down would otherwise interrupt asyncio's and the interpreter's teardown
    (tracebacks from atexit). Installed before uvicorn runs, so that asyncio's runner keeps
    out (it installs its own only over Python's default)."""
    fired = []

    def on_sigint(signum, frame):
        if fired:
            os.write(2, b"\n")  # no print in a handler: stderr's buffer may be mid-write
            os._exit(130)
        fired.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def serve(session: ChatSession, host: str = "127.0.0.1", port: int = 8765, echo=print) -> None:
    """Serve the web chat until interrupted; prints the URL first."""
    import uvicorn

    sock = bind(host, port)
    port = sock.getsockname()[1]
    app = create_app(session, port)
    shown = f"[{host}]" if ":" in host else host
    echo(
        f"mlx-kto chat: open http://{shown}:{port}/  (ratings go to {session.feedback}; Ctrl-C stops)"
    )
    if host not in ("127.0.0.1", "::1", "localhost"):
        echo(f"warning: bound to {host}: anyone who can reach this address can chat and rate")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Ctrl-C: replies still streaming end at their next token (sent as done),
            # so the graceful shutdown does not wait for them to run to max_tokens. A
            # signal handler, maybe re-entered by the next Ctrl-C: it takes no lock.
            app.stop_streams()
            super().handle_exit(sig, frame)

    # A client that keeps its connection open cannot hold a stop up for more than 5 s.
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = Server(config)
    _exit_on_second_ctrl_c()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
        pass
    echo(f"mlx-kto chat: stopped (ratings are in {session.feedback})")
