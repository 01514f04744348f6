"""The local web chat: a starlette app over one `ChatSession`, served by uvicorn.

Endpoints (all fixed; none takes a path): `/`, `/app.js`, `/style.css` (the page,
shipped as package data), `GET /api/info`, `POST /api/reply` (streams a reply as
server-sent events), `POST /api/rate`, `POST /api/undo`, `GET /api/ratings`.
The page keeps the conversation (in sessionStorage, so a reload keeps it) and sends
it with each turn; the server keeps every
reply it generated, so a rating can only name a reply this server produced (a page
cannot write arbitrary text into the feedback file).

Guard (`LocalOnly`): requests whose Host is not `localhost` or an IP literal with our
port get 403 (a DNS-rebinding page reaches us under its own domain name), and so do
requests whose Origin is not this page's own (cross-site POSTs; every POST must
carry Origin, which browsers always send on POST).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
from importlib import resources

from mlx_kto.collect.session import ChatSession
from mlx_kto.data.feedback import append_row, read_ratings, retraction_row
from mlx_kto.errors import UserError

MAX_BODY = 1 << 20  # 1 MB of JSON is far more than a chat turn
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
                body = f"forbidden: {why}\n".encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _clean_messages(value) -> list[dict]:
    """The page's conversation: user/assistant turns of plain text, ending with the user."""
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ValueError(f"messages[{i}]: role must be 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise ValueError("the last message must be the user's (non-empty)")
    return out


def create_app(session: ChatSession, port: int):
    """The starlette app for `session`; `port` is the one the guard accepts in Host."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    gen_lock = asyncio.Lock()  # one generation at a time: one model, one CPU/GPU
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

    async def body_json(request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ValueError("send application/json")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ValueError("request too large")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def bad(msg: str, status: int = 400):
        return JSONResponse({"error": msg}, status_code=status)

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
        try:
            prompt = system + _clean_messages((await body_json(request)).get("messages"))
        except ValueError as e:
            return bad(str(e))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(kind, value):  # on the MLX thread: hand over to the event loop
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        async def events():
            async with gen_lock:
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

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    async def rate(request: Request):
        try:
            data = await body_json(request)
        except ValueError as e:
            return bad(str(e))
        r = session.replies.get(data.get("reply_id"))
        if r is None:
            return bad("no such reply (only replies from this server can be rated)", 404)
        if not isinstance(data.get("label"), bool):
            return bad("'label' must be true (thumbs up) or false (thumbs down)")
        try:
            rid = await asyncio.to_thread(session.rate, r, data["label"])  # fsync off the loop
        except UserError as e:
            return bad(str(e))
        return JSONResponse({"rating_id": rid, "label": r.label})

    async def undo(request: Request):
        try:
            data = await body_json(request)
        except ValueError as e:
            return bad(str(e))
        rid = data.get("rating_id")
        live = await asyncio.to_thread(read_ratings, session.feedback)
        if not isinstance(rid, str) or rid not in {row.get("id") for row in live}:
            return bad("no such rating in the feedback file", 404)
        mine = next((r for r in session.replies.values() if r.rating_id == rid), None)
        if mine is not None:
            await asyncio.to_thread(session.undo, mine)
        else:
            await asyncio.to_thread(append_row, session.feedback, retraction_row(rid))
        return JSONResponse({"retracted": rid, "reply_id": mine.id if mine else None})

    async def ratings(request: Request):
        rows = await asyncio.to_thread(read_ratings, session.feedback)
        out = []
        for row in reversed(rows[-500:]):
            prompt = row.get("prompt")
            last_user = (
                next(
                    (
                        m.get("content")
                        for m in reversed(prompt)
                        if isinstance(m, dict) and m.get("role") == "user"
                    ),
                    None,
                )
                if isinstance(prompt, list)
                else prompt
            )
            comp = row.get("completion")
            if isinstance(comp, list) and comp and isinstance(comp[0], dict):
                comp = comp[0].get("content")
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            out.append(
                {
                    "id": row.get("id"),
                    "label": row.get("label"),
                    "prompt": last_user,
                    "completion": comp,
                    "time": meta.get("time"),
                    "reply_id": meta.get("reply"),
                    "undoable": isinstance(row.get("id"), str),
                }
            )
        return JSONResponse({"feedback": str(session.feedback), "ratings": out})

    routes = [Route(path, page, methods=["GET"]) for path in STATIC]
    routes += [
        Route("/api/info", info, methods=["GET"]),
        Route("/api/reply", reply, methods=["POST"]),
        Route("/api/rate", rate, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/ratings", ratings, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return LocalOnly(app, port)


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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: a normal stop
        pass
    echo(f"mlx-kto chat: stopped (ratings are in {session.feedback})")
