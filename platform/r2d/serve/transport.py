"""How answers travel: SSE events, a watcher for clients that leave, and the backstop deadline.

Plain asyncio and ASGI (FastAPI's streaming response), no FastAPI state: :mod:`r2d.serve.api` composes them.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

from fastapi.responses import StreamingResponse

from r2d.serve.schemas import Delta


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class DeadlineExceeded(Exception):
    """The engine did not finish (or stop) a request by its deadline."""


class SSEResponse(StreamingResponse):
    """A streaming response that stops its body, and so the engine request, as soon as the client leaves.

    Starlette notices a disconnect only when it next sends; guard mode may send nothing for
    many tokens, so a watcher task waits for ``http.disconnect`` alongside the body.
    """

    async def __call__(self, scope, receive, send) -> None:
        body = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({body, gone}, return_when=asyncio.FIRST_COMPLETED)
            if body.done() and not body.cancelled() and not isinstance(body.exception(), OSError):
                body.result()
        finally:
            for task in (body, gone):
                task.cancel()
            await asyncio.gather(body, gone, return_exceptions=True)
            await self.body_iterator.aclose()


def delta_body(reasoning: str, content: str) -> dict:
    delta: dict = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def disconnected(receive) -> None:
    """Return when the client has gone (the body was already read, so only ``http.disconnect`` is left)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request, coro):
    """Await ``coro``, or cancel it and raise :class:`ClientGone` when the client disconnects first."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientGone()
    finally:
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)


async def within(awaitable, deadline: float | None):
    """Await ``awaitable``; :class:`asyncio.TimeoutError` once ``deadline`` (wall clock; 0 or None: never) passes.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the result, and drops the cancellation, when the task
    is cancelled just as the awaited item arrives. A request whose client left then went on generating to
    ``max_tokens``. Here the awaitable runs in the caller's own task, so a cancellation always reaches it.
    """
    if not deadline:
        return await awaitable
    if not hasattr(asyncio, "timeout"):  # Python 3.10
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.time()))
    async with asyncio.timeout(max(0.0, deadline - time.time())):
        return await awaitable


async def timed(stream, deadline: float):
    """The stream's items; past ``deadline`` (wall clock) an engine that did not stop is abandoned."""
    iterator = stream.__aiter__()
    while True:
        try:
            item = await within(iterator.__anext__(), max(deadline, time.time() + 0.001))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the model did not answer within the request deadline") from None
        yield item


async def until_stop(deltas, stops: list[str]):
    """The deltas' text up to the first of ``stops`` (excluded), where the stream then ends.

    Text that may be the start of a stop string is held back until the next delta rules it
    out, so no part of a stop string ever reaches the client; so are the log-probability entries of the
    tokens whose text starts there (positions by the tokens' own texts). The last delta carries finish
    reason ``stop`` and the matched string; the caller closes the engine stream.
    """
    hold = max(map(len, stops)) - 1
    text, sent = "", 0
    held, next_at = [], 0  # log-probability entries not sent yet, with where each token's text starts

    def release(end: int, logprobs) -> list | None:
        """The held entries of tokens starting before ``end`` (None when the stream carries none)."""
        nonlocal held
        if logprobs is None and not held:
            return None
        out = [entry for at, entry in held if at < end]
        held = [(at, entry) for at, entry in held if at >= end]
        return out

    async for delta in deltas:
        if delta.error:
            yield delta
            return
        start = max(0, len(text) - hold)
        text += delta.text
        for entry in delta.logprobs or ():
            held.append((next_at, entry))
            next_at += len(entry["token"])
        found = [(at, s) for s in stops if (at := text.find(s, start)) >= 0]
        if found:
            at, matched = min(found)
            yield replace(delta, text=text[sent:at], finish_reason="stop", stop_string=matched,
                          logprobs=release(at, delta.logprobs))  # the stop string's own tokens are left out
            return
        end = len(text) if delta.finish_reason else max(sent, len(text) - hold)
        yield replace(delta, text=text[sent:end], logprobs=release(end, delta.logprobs))
        sent = end


async def first_delta(deltas) -> Delta:
    """The first delta of a stream (so errors before any output get a real status code)."""
    async for delta in deltas:
        return delta
    return Delta("", "stop")


async def chain(pending: list, stream):
    for item in pending:
        yield item
    async for item in stream:
        yield item


async def interleave(streams: list):
    """The items of several async generators as each produces them (one: as it is, no task).

    An error in any of them ends the whole and is raised; however it ends, every generator is closed.
    """
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(done)
        except Exception as err:  # noqa: BLE001  (handed to the consumer, which raises it)
            await queue.put(err)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(streams)
        while left:
            item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
