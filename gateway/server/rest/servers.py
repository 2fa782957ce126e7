"""The HTTP servers the REST edge runs on, all on the gateway's own event loop (the pipeline's):
uvicorn (an ASGI server; HTTP/1.1 parsed by httptools, llhttp in C) or aiohttp (its own C
parser). Each hands a request's method, path, headers and body chunks to ``RestApp.serve``
(which bounds the body) and writes its ``Reply``.
``server.http_transport`` chooses; both are measured in benchmarks/bench_http.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, Protocol

from gateway.server.rest.app import Reply, RestApp

__all__ = ["HttpServer", "HttpTransport", "make_http_server"]

log = logging.getLogger(__name__)

HttpTransport = Literal["uvicorn", "aiohttp"]


class HttpServer(Protocol):
    port: int
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Certificate:
    """The server's certificate and key (PEM files) for HTTPS; TLS 1.2 at least."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_http_server(
    kind: HttpTransport,
    app: RestApp,
    host: str,
    port: int,
    tls: Certificate | None = None,
    reuse_port: bool = False,
) -> HttpServer:
    """``reuse_port``: bound with SO_REUSEPORT, the workers of ``--workers`` sharing it."""
    sock = _listening(host, port) if reuse_port else None
    if kind == "aiohttp":
        return AiohttpServer(app, host, port, tls, sock)
    return UvicornServer(app, host, port, tls, sock)


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class _Bound:
    """What either HTTP server is given: the app, where to listen (``sock``: a socket already
    bound, shared by the workers) and the certificate for HTTPS."""

    def __init__(
        self,
        app: RestApp,
        host: str,
        port: int,
        tls: Certificate | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._app = app
        self._host = host
        self.port = port
        self._tls = tls
        self._sock = sock


class UvicornServer(_Bound):
    """uvicorn serving a plain ASGI callable (no framework between it and ``RestApp``)."""

    name = "uvicorn"
    _server: Any = None
    _task: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, port = scope.get("client") or ("", 0)
        try:
            reply = await self._app.serve(
                scope["method"], scope["path"], headers, _asgi_body(receive), f"ipv4:{host}:{port}"
            )
        except _Disconnected:
            return
        await _asgi_reply(send, reply)

    async def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(
            self,
            host=self._host,
            port=self.port,
            loop="none",  # the running loop (the gateway's)
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            # NOTE: a request's headers and body are read before the app runs; the body is
            # bounded by __call__, the headers by h11/httptools' own limits.
            timeout_keep_alive=75,
            ssl_certfile=self._tls.cert_file if self._tls else None,
            ssl_keyfile=self._tls.key_file if self._tls else None,
        )
        self._server = uvicorn.Server(config)
        sockets = [self._sock] if self._sock is not None else None
        self._task = asyncio.create_task(self._server.serve(sockets), name="http server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it (the port taken ...)
                raise RuntimeError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._server = self._task = None


class _Disconnected(Exception):
    """The client went away before its body was read."""


async def _asgi_body(receive: Any) -> AsyncIterator[bytes]:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        yield message.get("body", b"")
        more = message.get("more_body", False)


async def _asgi_reply(send: Any, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
        *((k.encode(), v.encode()) for k, v in reply.headers),
    ]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class AiohttpServer(_Bound):
    """aiohttp's low-level server (no router, no middlewares) around ``RestApp``."""

    name = "aiohttp"
    _runner: Any = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        reply = await self._reply(request)
        response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response.content_type = reply.content_type
        return response

    async def _reply(self, request: Any) -> Reply:
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        where = f"ipv4:{peer[0]}:{peer[1]}" if peer else ""
        chunks = request.content.iter_chunked(1 << 16)
        return await self._app.serve(request.method, request.path, headers, chunks, where)

    async def start(self) -> None:
        from aiohttp import web

        # The body as sent: RestApp inflates it, bounded (aiohttp's own would not be).
        server = web.Server(self._handle, access_log=None, auto_decompress=False)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        context = self._tls.context() if self._tls is not None else None
        site: Any
        if self._sock is not None:
            site = web.SockSite(self._runner, self._sock, ssl_context=context)
        else:
            site = web.TCPSite(self._runner, self._host, self.port, ssl_context=context)
        await site.start()
        sockets = self._runner.addresses
        self.port = int(sockets[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
