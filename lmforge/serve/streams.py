"""Plumbing between engine streams and HTTP: merging a request's prompts, server-sent events, and making sure a
client that goes away aborts its engine requests however the response ends."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lmforge.engine.async_engine import RequestStream
from lmforge.engine.outputs import RequestOutput

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event, as OpenAI frames them: a `data:` line of JSON and a blank line."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several engine streams, in arrival order, until all have finished."""
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


async def collect(streams: list[RequestStream], on_output: Callable[[int, RequestOutput], None]) \
        -> list[RequestOutput]:
    """Runs every stream to its end; returns each one's final output."""
    final: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        on_output(i, out)
        final[i] = out
    return final  # type: ignore[return-value]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """work's result, or None (work cancelled) if the client disconnects first: a non-streamed request whose
    client left stops generating instead of finishing for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        gone.cancel()
        task.cancel()


class EventStream(StreamingResponse):
    """An SSE response that closes its engine streams when it ends for any reason (finished, client gone before
    or during the body, server shutdown), so no request keeps generating for nobody."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
