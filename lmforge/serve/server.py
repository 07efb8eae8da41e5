"""The app under uvicorn: a deadline for each request's head (uvicorn has none, so a client that trickles header bytes
holds a connection for ever: slow-loris), and a graceful shutdown that ends the streams it has to cut with an error
event and `data: [DONE]` instead of dropping the connection mid-stream."""

import asyncio
import functools
import logging
import socket

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("lmforge")

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds; any client sends its request line and headers in milliseconds
CUT_GRACE = 5.0  # seconds uvicorn waits after the cut before cancelling what is still running (a backstop)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection whose next request line and headers have not all arrived within
    `header_timeout` seconds of its opening (or of its previous response) is closed. uvicorn's keep-alive timeout
    does not do this: every byte received restarts it, and a new connection has none."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._cycle_awaited = None  # the request cycle current when the deadline was set: a new one means a head

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._arm()  # first: the base may go on to a pipelined request, whose head then disarms it
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not self._cycle_awaited:  # a request's head has arrived
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._cycle_awaited = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_server(app: FastAPI, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT, shutdown_timeout: float = 30.0,
                   access_log: bool = True, log_level: int | str | None = None) -> uvicorn.Server:
    """A uvicorn.Server for the app with lmforge's protocol; run it with `serve`."""
    config = uvicorn.Config(app, http=functools.partial(HeaderDeadlineProtocol, header_timeout=header_timeout),
                            lifespan="off", access_log=access_log, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + CUT_GRACE)
    return uvicorn.Server(config)


async def serve(server: uvicorn.Server, sock: socket.socket, shutdown_timeout: float) -> None:
    """Runs the server on `sock` until it is told to exit (SIGTERM, SIGINT, `server.should_exit`). Then requests in
    flight have `shutdown_timeout` seconds to finish; those that have not are ended with an error (a stream's last
    events are the error and [DONE], a whole response is a 503), so none is left cut off mid-response."""
    state = server.config.app.state.lmforge
    running = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.should_exit and not running.done():  # uvicorn's own main loop polls the flag just as often
        await asyncio.wait({running}, timeout=0.1)
        if state.engine.fatal is not None:  # the engine cannot serve any more: stop (the command exits non-zero)
            server.should_exit = True
    if not running.done():
        try:
            await asyncio.wait_for(asyncio.shield(running), shutdown_timeout)
        except TimeoutError:
            await state.cut_streams()
    await running
