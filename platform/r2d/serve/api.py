"""The OpenAI-compatible HTTP API as a plain FastAPI app, independent of Ray.

:func:`create_api` takes the serving config and an engine *client* (anything with
``stream(GenRequest)``, ``close(stream)`` and ``call(name, *args)``): a Serve deployment
handle in production (:class:`HandleClient`), or an engine object in-process
(:class:`LocalClient`) so that unit tests drive the real app with a real tiny model
and no Ray.

The safety boundary lives here, in front of any engine:

- keys (:mod:`r2d.serve.auth`): the API key on every route but ``/healthz``; the admin key
  on ``/admin/*`` and on a request that asks for a mode weaker than ``serve.mode``;
- modes: a request gets ``serve.mode`` unless it asks for one listed in ``serve.allowed_modes``;
- limits: JSON bodies only (415), body size, messages, characters, every sampling number;
- time: a deadline per request, and generation stops when the client goes away;
- guard mode streams through :class:`r2d.serve.pivot_modes.GuardStream`, the same view as
  the non-streaming answer.

Every failure becomes an OpenAI-style error body with a 4xx, 503 or 504 status; the
routes never let an exception escape as a 500. A stream that fails after its first byte
ends with an error event and no ``[DONE]``, so a client can tell it from a finished one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
import uuid
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from r2d.serve.auth import ADMIN_HEADER, bearer, check_exposure, read_key, same_key
from r2d.serve.metrics import ServeMetrics
from r2d.serve.openapi import RESPONSES, chat_operation, openapi
from r2d.serve.pivot_modes import STRENGTH, GuardStream, HideStream, apply_mode
from r2d.serve.schemas import (SEED_MAX, ChatCompletionRequest, Delta, GenRequest, chunk_body, completion_body,
                               completion_id, deliver, error_body, merge, unsupported_field, usage_body)
from r2d.serve.transport import (ClientGone, DeadlineExceeded, SSEResponse, chain, delta_body, event, first_delta,
                                 interleave, timed, until_disconnect, until_stop)

log = logging.getLogger("r2d.serve")
_DEADLINE_GRACE_S = 10.0
"""How long past a request's deadline the ingress waits for an engine that should have stopped it."""


def _usage(lasts: list[Delta]) -> dict:
    """Usage over every choice: the prompt once, the completions added up (as OpenAI counts ``n``)."""
    return usage_body(lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts))


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), self.status, headers=headers)


def _ended_by_model(last: Delta) -> bool:
    """The model closed its output itself (not ``max_tokens``, a deadline, or the client's stop string)."""
    return last.finish_reason == "stop" and not last.stop_string


class LocalClient:
    """An engine object used in-process (tests, single-process tools)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def stream(self, req: GenRequest):
        return deliver(self.engine.stream_one(req), req.stream)

    def close(self, stream):
        return stream.aclose()  # runs the engine generator's cleanup: the request stops generating

    async def call(self, name: str, *args):
        result = getattr(self.engine, name)(*args)
        return await result if inspect.isawaitable(result) else result


class HandleClient:
    """A Serve deployment handle to an engine deployment."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def stream(self, req: GenRequest):
        return self.handle.options(stream=True).generate.remote(req)

    def close(self, stream) -> None:
        stream.cancel()  # Serve cancels the replica's generator; the engine aborts the request

    async def call(self, name: str, *args):
        return await getattr(self.handle, name).remote(*args)


def create_api(cfg, client, metrics: ServeMetrics | None = None) -> FastAPI:
    """Build the API for a :class:`r2d.config.ServeConfig` and an engine client.

    Raises:
        r2d.serve.auth.AuthConfigError: a key file is unreadable, or ``cfg.host`` is not
            loopback and no API key is set (and ``cfg.insecure`` is off).
    """
    api = FastAPI(title="R2D chat completions", version="1", docs_url=None, redoc_url=None)
    state = _State(cfg, client, metrics or ServeMetrics())
    api.state.r2d = state

    @api.post("/v1/chat/completions", openapi_extra=chat_operation(), responses=RESPONSES)
    async def chat_completions(request: Request):
        return await state.guarded(request, state.chat)

    @api.get("/v1/models", responses=RESPONSES)
    async def models(request: Request):
        return await state.guarded(request, state.models)

    @api.get("/healthz")
    async def healthz(request: Request):
        return await state.health()

    @api.post("/admin/reload", responses=RESPONSES)
    async def reload(request: Request):
        return await state.guarded(request, state.reload, admin=True)

    api.openapi = lambda: openapi(api, cfg)
    return api


class _State:
    """What the routes share: config, keys, engine client, readiness, counters."""

    def __init__(self, cfg, client, metrics: ServeMetrics) -> None:
        self.cfg, self.client, self.metrics = cfg, client, metrics
        self.api_key = read_key(cfg.api_key_env, cfg.api_key_file, "API key")
        self.admin_key = read_key(cfg.admin_key_env, cfg.admin_key_file, "admin key")
        check_exposure(cfg.host, self.api_key, cfg.insecure)
        self.ready = False
        self._warmup = None

    # ------------------------------------------------------------ plumbing

    async def guarded(self, request: Request, handler, admin: bool = False):
        """Authenticate, run the handler, and turn every failure into a 4xx/503/504 error body."""
        try:
            self._authenticate(request, admin)
            return await handler(request)
        except ApiError as err:
            self.metrics.request(err.status, "-", False)
            return err.response()
        except ClientGone:
            self.metrics.request(499, "-", False)
            return Response(status_code=499)  # nobody reads it; the status is for the access log
        except DeadlineExceeded as err:
            self.metrics.request(504, "-", False)
            return ApiError(504, str(err), "server_error").response()
        except Exception as err:  # the engine died, a replica is gone, a bug: never a 500
            log.warning("request failed: %s: %s", type(err).__name__, err)
            self.metrics.request(503, "-", False)
            return ApiError(503, f"the model backend failed: {type(err).__name__}", "server_error").response()

    def _authenticate(self, request: Request, admin: bool) -> None:
        token = bearer(request.headers.get("authorization", ""))
        if admin:
            if not self.admin_key:
                raise ApiError(403, "the admin API is off: no admin key is configured (serve.admin_key_file or "
                                    "serve.admin_key_env)", "permission_error")
            if not same_key(token, self.admin_key):
                raise ApiError(401, "missing or wrong admin key (Authorization: Bearer <admin key>)",
                               "authentication_error", code="invalid_api_key")
            return
        if self.api_key and not same_key(token, self.api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    async def _read_json(self, request: Request) -> dict:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise ApiError(415, f"content type {media or 'none'!r} is not JSON; send Content-Type: application/json")
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
        mode = self._mode(body, request)
        self._check_logprobs(body, mode)
        gens = self._gen_requests(body)
        if self.cfg.log_prompts:
            log.info("request %s prompt=%r", gens[0].request_id, gens[0].messages)
        else:
            log.info("request %s: %d messages, max_tokens=%d, n=%d, mode=%s", gens[0].request_id,
                     len(gens[0].messages), gens[0].max_tokens, len(gens), mode)
        streams = [self.client.stream(gen) for gen in gens]
        choices = [self._deltas(stream, gen, body.stop) for stream, gen in zip(streams, gens)]
        try:
            firsts = await until_disconnect(request, asyncio.gather(*(first_delta(c) for c in choices)))
            for first in firsts:
                if first.error:
                    raise ApiError(400, first.error, param=first.param or "messages",
                                   code=None if first.param else "context_length_exceeded")
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                self.metrics.request(200, mode, True)
                events = self._sse(firsts, choices, streams, mode, include_usage)
                return SSEResponse(events, media_type="text/event-stream")
            result = await until_disconnect(request, self._complete(firsts, choices, mode,
                                                                     bool(body.logprobs)))
            await self._close(streams)  # a stop string may end the answer before the engine does
            return result
        except BaseException:
            await self._close(streams)
            raise

    @staticmethod
    def _deltas(stream, gen: GenRequest, stop: list[str] | None):
        deltas = timed(stream, gen.deadline + _DEADLINE_GRACE_S)
        return until_stop(deltas, stop) if stop else deltas

    async def _close(self, streams) -> None:
        """Close the engine requests. A handle's cancel happens here and now, before any await: this runs in
        ``finally`` blocks of a task being cancelled, where a second cancellation would interrupt an await."""
        closing = [c for c in (self.client.close(stream) for stream in streams) if c is not None]
        if closing:
            await asyncio.gather(*closing)

    # ------------------------------------------------------------ validation

    def _parse(self, data: dict) -> ChatCompletionRequest:
        try:
            body = ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(422, f"{where}: {first['msg']}", param=where) from None
        unsupported = unsupported_field(data)
        if unsupported:
            raise ApiError(400, f"{unsupported}: not supported by this server; leave it out", param=unsupported)
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
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        if body.n is not None and body.n > self.cfg.max_choices:
            raise ApiError(422, f"n: {body.n} choices; the limit is {self.cfg.max_choices}", param="n")
        wanted = body.wanted_tokens()
        if wanted is not None and wanted > self.cfg.max_tokens_limit:
            raise ApiError(422, f"max_tokens: {wanted}; the limit is {self.cfg.max_tokens_limit}",
                           param="max_tokens")
        return body

    def _mode(self, body: ChatCompletionRequest, request: Request) -> str:
        """The configured mode; another one only when listed, and a weaker one only with the admin key."""
        mode, configured = body.r2d_mode or self.cfg.mode, self.cfg.mode
        if mode == configured:
            return mode
        if mode not in self.cfg.allowed_modes:
            allowed = [configured, *(m for m in self.cfg.allowed_modes if m != configured)]
            raise ApiError(403, f"r2d_mode: {mode!r} is not allowed on this server; allowed: {allowed}",
                           "permission_error", param="r2d_mode")
        if STRENGTH[mode] < STRENGTH[configured] and not same_key(request.headers.get(ADMIN_HEADER, ""),
                                                                  self.admin_key):
            raise ApiError(403, f"r2d_mode: {mode!r} shows more than this server's mode {configured!r}; it needs "
                                f"the admin key in the {ADMIN_HEADER} header", "permission_error", param="r2d_mode")
        return mode

    @staticmethod
    def _check_logprobs(body: ChatCompletionRequest, mode: str) -> None:
        """Log-probabilities only where the whole generation is shown: in hide and guard modes they would
        give away the hidden reasoning (every token's, and its alternatives), and guard's replaced answers."""
        if body.logprobs and mode != "show":
            raise ApiError(400, f"logprobs: not available in r2d_mode {mode!r}, where they would reveal the hidden "
                                "reasoning; ask in r2d_mode 'show'", param="logprobs")

    def _gen_requests(self, body: ChatCompletionRequest) -> list[GenRequest]:
        """One engine request per choice (``n``); with a seed, choice i samples with seed + i (mod 2**63):
        reproducible, and not n copies of one answer."""
        first = self._gen_request(body)
        return [first] + [dataclasses.replace(first, request_id=uuid.uuid4().hex,
                                              seed=None if first.seed is None else (first.seed + i) % (SEED_MAX + 1))
                          for i in range(1, body.n or 1)]

    def _gen_request(self, body: ChatCompletionRequest) -> GenRequest:
        # Chat templates know system/user/assistant; "developer" is OpenAI's new name for system.
        roles = {"developer": "system"}
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        return GenRequest(messages=messages, max_tokens=body.wanted_tokens() or self.cfg.default_max_tokens,
                          temperature=body.temperature if body.temperature is not None else 0.0,
                          top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
                          presence_penalty=body.presence_penalty or 0.0,
                          frequency_penalty=body.frequency_penalty or 0.0,
                          stream=bool(body.stream or body.stop), deadline=time.time() + self.cfg.request_timeout_s,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else None)

    # ------------------------------------------------------------ responses

    async def _complete(self, firsts: list[Delta], choices: list, mode: str, want_logprobs: bool) -> dict:
        async def answer(i: int, first: Delta, deltas):
            whole = first
            async for delta in deltas:
                whole = merge(whole, delta)
            result = apply_mode(whole.text, mode, stopped=_ended_by_model(whole))
            self._record(result, 200, mode, False, count_request=i == 0)
            message = {"role": "assistant", "content": result.content,
                       "reasoning_content": result.reasoning, "reasoning": result.reasoning}
            lps = (whole.logprobs or []) if want_logprobs else None  # asked for: a list, even of no tokens
            return (message, whole.finish_reason or "stop", result.meta(), lps), whole

        done = await asyncio.gather(*(answer(i, f, c) for i, (f, c) in enumerate(zip(firsts, choices))))
        return completion_body(completion_id(), self.cfg.served_model_name, [a for a, _ in done],
                               _usage([last for _, last in done]))

    async def _sse(self, firsts: list[Delta], choices: list, streams, mode: str, include_usage: bool):
        """SSE chunks of every choice, interleaved as they come; the engine requests are closed however
        the stream ends (finished, failed, or the client left)."""
        cid, created, model = completion_id(), int(time.time()), self.cfg.served_model_name
        lasts = list(firsts)

        async def choice_chunks(i: int, first: Delta, deltas):
            view = GuardStream() if mode == "guard" else HideStream()
            raw = ""
            yield chunk_body(cid, model, created, {"role": "assistant", "content": ""}, index=i)
            async for delta in chain([first], deltas):
                raw, lasts[i] = raw + delta.text, delta
                if mode == "show":  # deltas carry logprobs only when asked (show mode only), maybe before their text
                    if delta.text or delta.logprobs:
                        yield chunk_body(cid, model, created, {"content": delta.text} if delta.text else {},
                                         index=i, logprobs=delta.logprobs or None)
                    continue
                if not delta.text:
                    continue
                reasoning, content = view.feed(delta.text)
                if reasoning or content:
                    yield chunk_body(cid, model, created, delta_body(reasoning, content), index=i)
            stopped = _ended_by_model(lasts[i])
            result = apply_mode(raw, mode, stopped)
            tail = ("", "") if mode == "show" else view.feed("", final=True, stopped=stopped)
            if tail[0] or tail[1]:
                yield chunk_body(cid, model, created, delta_body(*tail), index=i)
            self._record(result, 200, mode, True, count_request=False)
            yield chunk_body(cid, model, created, {}, lasts[i].finish_reason or "stop", {"r2d": result.meta()}, index=i)

        try:
            async with aclosing(interleave([choice_chunks(i, f, c) for i, (f, c) in
                                            enumerate(zip(firsts, choices))])) as chunks:
                async for chunk in chunks:
                    yield event(chunk)
            if include_usage:
                yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [], "usage": _usage(lasts)})
            yield "data: [DONE]\n\n"
        except Exception as err:
            log.warning("stream failed: %s: %s", type(err).__name__, err)
            message = str(err) if isinstance(err, DeadlineExceeded) else f"the model backend failed: {type(err).__name__}"
            yield event(error_body(message, "server_error"))
        finally:
            await self._close(streams)

    def _record(self, result, status: int, mode: str, stream: bool, count_request: bool = True) -> None:
        self.ready = True
        if count_request:
            self.metrics.request(status, mode, stream)
        self.metrics.pivots(result.pivots)
        if result.guarded:
            self.metrics.guard_refusal(result.guard_reason or "unknown")
