"""The OpenAI-compatible HTTP API as a plain FastAPI app, independent of Ray.

:func:`create_api` takes the serving config and an engine *client* (anything with
``stream(GenRequest)`` and ``call(name, *args)``): a Serve deployment handle in
production (:class:`HandleClient`), or an engine object in-process
(:class:`LocalClient`) so that unit tests drive the real app with a real tiny model
and no Ray.

Every failure becomes an OpenAI-style error body with a 4xx or 503 status; the
routes never let an exception escape as a 500.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from r2d.serve.metrics import ServeMetrics
from r2d.serve.pivot_modes import MODES, HideStream, apply_mode
from r2d.serve.schemas import (ChatCompletionRequest, GenRequest, chunk_body, completion_body, completion_id,
                               deliver, error_body, usage_body)

log = logging.getLogger("r2d.serve")


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), self.status, headers=headers)


class LocalClient:
    """An engine object used in-process (tests, single-process tools)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def stream(self, req: GenRequest):
        return deliver(self.engine.stream_one(req), req.stream)

    async def call(self, name: str, *args):
        result = getattr(self.engine, name)(*args)
        return await result if inspect.isawaitable(result) else result


class HandleClient:
    """A Serve deployment handle to an engine deployment."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def stream(self, req: GenRequest):
        return self.handle.options(stream=True).generate.remote(req)

    async def call(self, name: str, *args):
        return await getattr(self.handle, name).remote(*args)


def create_api(cfg, client, metrics: ServeMetrics | None = None) -> FastAPI:
    """Build the API for a :class:`r2d.config.ServeConfig` and an engine client."""
    api = FastAPI(title="R2D chat completions", version="1", docs_url=None, redoc_url=None)
    state = _State(cfg, client, metrics or ServeMetrics())
    api.state.r2d = state

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await state.guarded(request, state.chat)

    @api.get("/v1/models")
    async def models(request: Request):
        return await state.guarded(request, state.models)

    @api.get("/healthz")
    async def healthz(request: Request):
        return await state.health()

    @api.post("/admin/reload")
    async def reload(request: Request):
        return await state.guarded(request, state.reload)

    return api


class _State:
    """What the routes share: config, engine client, readiness, counters."""

    def __init__(self, cfg, client, metrics: ServeMetrics) -> None:
        self.cfg, self.client, self.metrics = cfg, client, metrics
        self.api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.ready = False
        self._warmup = None

    # ------------------------------------------------------------ plumbing

    async def guarded(self, request: Request, handler):
        """Authenticate, run the handler, and turn every failure into a 4xx/503 error body."""
        try:
            self._authenticate(request)
            return await handler(request)
        except ApiError as err:
            self.metrics.request(err.status, "-", False)
            return err.response()
        except Exception as err:  # the engine died, a replica is gone, a bug: never a 500
            log.warning("request failed: %s: %s", type(err).__name__, err)
            self.metrics.request(503, "-", False)
            return ApiError(503, f"the model backend failed: {type(err).__name__}", "server_error").response()

    def _authenticate(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "invalid Content-Length header")
            if int(declared) > limit:
                raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
        return data

    # ------------------------------------------------------------ routes

    async def models(self, request: Request):
        info = await self.client.call("info")
        return {"object": "list", "data": [{"id": self.cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "r2d", "root": info.get("version")}]}

    async def reload(self, request: Request):
        return await self.client.call("reload", True)

    async def health(self):
        """Ready once a real generation has succeeded; until then a warm-up runs in the background."""
        import asyncio

        if self.ready:
            return {"status": "ok"}
        try:
            if self._warmup is None or (self._warmup.done() and self._warmup.exception() is not None):
                self._warmup = asyncio.ensure_future(self.client.call("warmup"))
            if self._warmup.done() and self._warmup.result():
                self.ready = True
                return {"status": "ok"}
        except (Exception, asyncio.CancelledError) as err:  # retried on the next probe
            log.warning("warm-up failed: %s: %s", type(err).__name__, err)
            self._warmup = None
        return JSONResponse({"status": "warming_up"}, 503)

    async def chat(self, request: Request):
        body = self._parse(await self._read_json(request))
        mode = self._mode(body)
        gen = self._gen_request(body)
        if self.cfg.log_prompts:
            log.info("request %s prompt=%r", gen.request_id, gen.messages)
        else:
            log.info("request %s: %d messages, max_tokens=%d, mode=%s", gen.request_id, len(gen.messages),
                     gen.max_tokens, mode)
        stream = self.client.stream(gen)
        first = await _first(stream)
        if first.error:
            raise ApiError(400, first.error, param="messages", code="context_length_exceeded")
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            self.metrics.request(200, mode, True)
            return StreamingResponse(self._sse(first, stream, mode, include_usage), media_type="text/event-stream")
        return await self._complete(first, stream, mode)

    # ------------------------------------------------------------ validation

    def _parse(self, data: dict) -> ChatCompletionRequest:
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(422, f"{where}: {first['msg']}", param=where) from None
        if body.n is not None and body.n > 1:
            raise ApiError(400, "n > 1 is not supported: one request returns one choice", param="n")
        if body.model and body.model != self.cfg.served_model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{self.cfg.served_model_name!r}", param="model", code="model_not_found")
        if len(body.messages) > self.cfg.max_messages:
            raise ApiError(422, f"messages: {len(body.messages)} messages; the limit is {self.cfg.max_messages}",
                           param="messages")
        for i, message in enumerate(body.messages):
            if len(message.text()) > self.cfg.max_message_chars:
                raise ApiError(422, f"messages.{i}.content: {len(message.text())} characters; the limit is "
                                    f"{self.cfg.max_message_chars}", param=f"messages.{i}.content")
        wanted = body.wanted_tokens()
        if wanted is not None and wanted > self.cfg.max_tokens_limit:
            raise ApiError(422, f"max_tokens: {wanted}; the limit is {self.cfg.max_tokens_limit}",
                           param="max_tokens")
        return body

    def _mode(self, body: ChatCompletionRequest) -> str:
        mode = body.r2d_mode or self.cfg.mode
        if mode not in MODES:
            raise ApiError(422, f"r2d_mode: {mode!r} is not a mode; expected one of {list(MODES)}", param="r2d_mode")
        if mode not in self.cfg.allowed_modes:
            raise ApiError(403, f"r2d_mode: {mode!r} is not allowed on this server; allowed: "
                                f"{list(self.cfg.allowed_modes)}", "permission_error", param="r2d_mode")
        return mode

    def _gen_request(self, body: ChatCompletionRequest) -> GenRequest:
        # Chat templates know system/user/assistant; "developer" is OpenAI's new name for system.
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        return GenRequest(messages=messages, max_tokens=body.wanted_tokens() or self.cfg.default_max_tokens,
                          temperature=body.temperature if body.temperature is not None else 0.0,
                          top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
                          stream=bool(body.stream))

    # ------------------------------------------------------------ responses

    async def _complete(self, first, stream, mode: str) -> dict:
        text, last = first.text, first
        async for delta in stream:
            text, last = text + delta.text, delta
        result = apply_mode(text, mode)
        self._record(result, 200, mode, False)
        message = {"role": "assistant", "content": result.content,
                   "reasoning_content": result.reasoning, "reasoning": result.reasoning}
        usage = usage_body(last.prompt_tokens, last.completion_tokens)
        return completion_body(completion_id(), self.cfg.served_model_name, message, last.finish_reason or "stop",
                               usage, result.meta())

    async def _sse(self, first, stream, mode: str, include_usage: bool):
        """SSE chunks; an error after the first byte can only be reported in-band, then [DONE]."""
        cid, created, model = completion_id(), int(time.time()), self.cfg.served_model_name
        yield _event(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
        view, raw, last = HideStream(), "", first
        try:
            pending = [first]
            async for delta in _chain(pending, stream):
                raw, last = raw + delta.text, delta
                if mode == "guard" or not delta.text:
                    continue  # guard decides on the whole answer: nothing leaves before the end
                if mode == "show":
                    yield _event(chunk_body(cid, model, created, {"content": delta.text}))
                    continue
                reasoning, content = view.feed(delta.text)
                if reasoning or content:
                    yield _event(chunk_body(cid, model, created, _delta(reasoning, content)))
            result = apply_mode(raw, mode)
            tail = view.feed("", final=True) if mode == "hide" else (
                (result.reasoning or "", result.content) if mode == "guard" else ("", ""))
            if tail[0] or tail[1]:
                yield _event(chunk_body(cid, model, created, _delta(*tail)))
            self._record(result, 200, mode, True, count_request=False)
            yield _event(chunk_body(cid, model, created, {}, last.finish_reason or "stop", {"r2d": result.meta()}))
            if include_usage:
                usage = usage_body(last.prompt_tokens, last.completion_tokens)
                yield _event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                              "choices": [], "usage": usage})
        except Exception as err:
            log.warning("stream failed: %s: %s", type(err).__name__, err)
            yield _event(error_body(f"the model backend failed: {type(err).__name__}", "server_error"))
        yield "data: [DONE]\n\n"

    def _record(self, result, status: int, mode: str, stream: bool, count_request: bool = True) -> None:
        self.ready = True
        if count_request:
            self.metrics.request(status, mode, stream)
        self.metrics.pivots(result.pivots)
        if result.guarded:
            self.metrics.guard_refusal(result.guard_reason or "unknown")


def _delta(reasoning: str, content: str) -> dict:
    delta: dict = {}
    if reasoning:
        delta["reasoning_content"] = delta["reasoning"] = reasoning
    if content:
        delta["content"] = content
    return delta


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _first(stream):
    """The first delta of a stream (so errors before any output get a real status code)."""
    from r2d.serve.schemas import Delta

    async for delta in stream:
        return delta
    return Delta("", "stop")


async def _chain(pending: list, stream):
    for item in pending:
        yield item
    async for item in stream:
        yield item
