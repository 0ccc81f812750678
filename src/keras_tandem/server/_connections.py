"""Connections: the listening socket, the cap on open connections, HTTP parse errors as JSON.

Owns: `ConnectionGuard`, the protocol factory of the listening socket. It
counts open connections and, at `max_connections`, answers a new one with a
JSON 503 and closes it at once (so the process never runs out of file
descriptors, and a client is never left hanging); below the cap it makes a
`_JsonErrorsHandler`, aiohttp's `RequestHandler` whose answer to a request
that fails HTTP parsing (URL or header too long, bad characters) is the
same JSON `{"error": ...}` as every other error, logged as one rate-limited
line instead of a traceback. `GuardedSite` listens with it. The header
timeout is aiohttp's keep-alive timer, which closes a connection that has
not completed a request's headers in time (idle keep-alive ones included).
Routes and request bodies are `_app`'s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from keras_tandem.server._limits import RateLimitedLog
from keras_tandem.server._protocol import error_body

log = logging.getLogger("keras_tandem.server")

# How many connections the event loop accepts per wake-up. Sockets accepted but
# not yet handed to a protocol (or refused but not yet closed) are not counted
# by the cap, and a few bursts of them can be in transit at once, so it stays
# small; CPython 3.11's accept loop (asyncio selector_events) also logs and
# retries once per slot of it when accept() fails with EMFILE. The kernel's
# listen backlog is set separately (`backlog`).
_ACCEPT_BURST = 8
_REFUSAL_LINGER_S = 1.0
_MAX_LINGERING = 64
_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
            b"CONNECT")


class ConnectionGuard:
    """The protocol factory of the server's socket: counts connections and caps them.

    Args:
        max_connections: the most connections open at once.
        handler_kwargs: keyword arguments of aiohttp's `RequestHandler`
            (`keepalive_timeout`, `access_log`, ...).
        observe: `observe(endpoint, code, error_kind=...)` of the metrics.
        logs: the rate-limited log.
        retry_after_s: the `Retry-After` of a refused connection's 503.
    """

    def __init__(self, max_connections: int, handler_kwargs: dict[str, Any],
                 observe: Callable[..., None], logs: RateLimitedLog, retry_after_s: int = 1):
        self.max_connections = int(max_connections)
        self.open = 0
        self.refused = 0
        self.lingering = 0
        self.max_lingering = max(1, min(_MAX_LINGERING, self.max_connections // 4))
        self._kwargs = handler_kwargs
        self._observe = observe
        self._logs = logs
        self._server: web.Server | None = None
        message = (f"Too many connections: the server has {self.max_connections} open, its "
                   "limit (tandem serve --max-connections). Retry shortly, or reuse a "
                   "keep-alive connection.")
        body = error_body(message)
        self._refusal = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (retry_after_s, len(body), body))

    def bind(self, server: web.Server) -> None:
        """Sets the aiohttp `Server` (the runner's) that handlers report to."""
        self._server = server

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.max_connections:
            self.refused += 1
            self._observe("other", 503, error_kind="too_many_connections")
            self._logs.log("too_many_connections", logging.WARNING,
                           "refused a connection: %d open, the limit (--max-connections)",
                           self.open)
            return _Refusal(self._refusal, self)
        self.open += 1
        return _JsonErrorsHandler(self._server, guard=self, loop=asyncio.get_running_loop(),
                                  **self._kwargs)

    def closed(self) -> None:
        """Counts a connection closed."""
        self.open -= 1

    def parse_error(self, status: int, exc: BaseException | None, remote: str | None) -> None:
        """Counts and logs (rate-limited, one line) a request that failed HTTP parsing."""
        self._observe("other", status, error_kind="bad_http")
        self._logs.log("bad_http", logging.INFO, "bad HTTP request from %s answered %d: %s",
                       remote, status, _short(exc))


class _Refusal(asyncio.Protocol):
    """Answers a connection over the cap with a 503 and closes it.

    Closing a socket with unread request bytes makes the kernel send a reset,
    which can reach the client before the 503; so the refusal half-closes,
    discards what the client sends for up to `_REFUSAL_LINGER_S`, then
    closes. At most `_MAX_LINGERING` refusals linger at once (each holds a
    descriptor: a quarter of `max_connections`, at most `_MAX_LINGERING`);
    beyond that they close at once.
    """

    def __init__(self, reply: bytes, guard: ConnectionGuard):
        self._reply = reply
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._reply)  # type: ignore[attr-defined]
        if self._guard.lingering >= self._guard.max_lingering or not transport.can_write_eof():
            transport.close()
            return
        self._guard.lingering += 1
        transport.write_eof()  # type: ignore[attr-defined]
        self._timer = asyncio.get_running_loop().call_later(_REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request nobody will answer

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._guard.lingering -= 1


class _JsonErrorsHandler(web.RequestHandler):
    """aiohttp's connection handler, with JSON answers to HTTP parse errors."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = True

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.closed()
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The JSON answer to a request aiohttp could not parse or handle."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")
        text = _short(exc) or message or "the request could not be handled"
        if isinstance(exc, LineTooLong):
            line, limit = bytes(exc.args[0]), exc.args[1]
            if line.startswith(b"/") or line.split(b" ", 1)[0] in _METHODS:
                status = 414
                text = (f"the URL is longer than {limit} bytes: send the inputs in a POST "
                        "body, not in the URL")
            else:
                status = 431
                text = f"a header line is longer than {limit} bytes"
        self._guard.parse_error(status, exc, request.remote)
        text = f"{HTTPStatus(status).phrase}: {text}"
        resp = web.Response(status=status, body=error_body(text),
                            content_type="application/json")
        resp.force_close()
        return resp


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


class GuardedSite(web.BaseSite):
    """A TCP site whose connections come from a `ConnectionGuard`.

    Args:
        runner: the aiohttp runner (set up).
        host: the address to bind.
        port: the port (0: a free one).
        guard: the protocol factory.
        backlog: the kernel's listen backlog.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 backlog: int = 1024):
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        """The site's URL."""
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        """Binds, listens and starts accepting."""
        await super().start()
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family,
                                    backlog=self._backlog)
        self._guard.bind(self._runner.server)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self._guard, sock=sock, backlog=_ACCEPT_BURST)
        except BaseException:
            sock.close()
            raise
        sock.listen(self._backlog)  # create_server set the backlog to the accept burst
