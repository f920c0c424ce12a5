"""Request and response shapes of the OpenAI-compatible chat API.

Requests are validated strictly (``"5"`` is not an integer) so that wrong types
get a 422 naming the field. An OpenAI field the server cannot honour (``tools``,
``logit_bias``…) is a 400 naming it (:data:`UNSUPPORTED_FIELDS`); fields outside
OpenAI's request (``user``, ``metadata``, vendor extensions) are ignored.

Every number is bounded to what both engines accept (:data:`SEED_MAX`,
:data:`MIN_TEMPERATURE`…): torch refuses seeds above 2**64-1 and vLLM's engine core fails
on seeds from 2**63, and a temperature of 1e-300 turns logits into inf/NaN. The engines
check the same bounds again (:func:`sampling_error`), per request, so a value that slips
past the ingress fails its own request and never the batch it shares.

Generation travels between the ingress and the engine as a :class:`GenRequest`
(plain dataclass: cheap to pickle through a Serve handle) and comes back as a
stream of :class:`Delta` items.
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]

SEED_MAX = 2**63 - 1
"""Largest seed: vLLM's engine core fails from 2**63 (torch from 2**64)."""
MIN_TEMPERATURE = 0.01
"""Smallest non-zero temperature: logits / 1e-300 overflow to inf (and fp16 logits already at 1e-4)."""
MAX_TEMPERATURE = 2.0
MIN_TOP_P = 0.001
"""Smallest top-p: below it a float32 top-p of 0 is all an engine sees."""
MAX_PENALTY = 2.0
"""OpenAI's bound on ``presence_penalty`` and ``frequency_penalty`` (either sign)."""
MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on ``top_logprobs`` (and vLLM's default ``max_logprobs``)."""


def sampling_error(temperature: float, top_p: float, seed: int | None, max_tokens: int,
                   penalties: dict[str, float] | None = None) -> str | None:
    """Why an engine must not run these sampling values (None: it may). Checked per request in both engines.

    ``penalties``: ``presence_penalty`` and ``frequency_penalty`` by name, each in OpenAI's [-2, 2].
    """
    import math

    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or not (
            temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        return f"temperature: got {temperature!r}, expected 0 or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]"
    if not (isinstance(top_p, (int, float)) and math.isfinite(top_p)) or not MIN_TOP_P <= top_p <= 1:
        return f"top_p: got {top_p!r}, expected a number in [{MIN_TOP_P}, 1]"
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        return f"seed: got {seed!r}, expected an integer in [0, 2**63-1]"
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return f"max_tokens: got {max_tokens!r}, expected an integer >= 1"
    for name, value in (penalties or {}).items():
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)) or \
                not -MAX_PENALTY <= value <= MAX_PENALTY:
            return f"{name}: got {value!r}, expected a number in [-{MAX_PENALTY}, {MAX_PENALTY}]"
    return None


class TextPart(BaseModel):
    """One part of a list-valued message content; only text is served."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Role
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request that the server acts on."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    """0 is greedy; otherwise at least MIN_TEMPERATURE."""
    top_p: float | None = Field(default=None, ge=MIN_TOP_P, le=1.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    """OpenAI's: subtracted once from the logit of every token the answer already holds."""
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    """OpenAI's: subtracted from a token's logit once per time the answer already holds it."""
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    """Up to 4 strings (one may come bare); a list after validation. The answer ends before the first
    one the model writes (finish reason ``stop``)."""
    logprobs: bool | None = None
    """Per generated token: its log-probability under the model (before temperature and penalties)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With ``logprobs``: the most likely tokens at each position too, this many."""
    r2d_mode: Literal["show", "hide", "guard"] | None = None
    """Per-request pivot mode: the server's own mode, or one its config allows (a weaker one needs the admin key)."""

    @field_validator("temperature")
    @classmethod
    def greedy_or_bounded(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"expected 0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        return value

    @field_validator("stop")
    @classmethod
    def few_short_stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"expected at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return stops or None

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


MAX_STOPS = 4
MAX_STOP_CHARS = 64

# OpenAI request fields this server cannot honour, with the values that ask for nothing (accepted
# as sent by clients that always fill them in). Anything else gets a 400 naming the field, never
# an answer that silently ignores what the client asked for. Unknown fields outside OpenAI's
# request (``user``, ``metadata``, vendor extensions) are ignored.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
}


def unsupported_field(data: dict) -> str | None:
    """The first OpenAI field in ``data`` that asks for something this server does not do."""
    for name, harmless in UNSUPPORTED_FIELDS.items():
        value = data.get(name)
        if name in data and not any(type(value) is type(h) and value == h for h in harmless):
            return name
    return None


@dataclass
class GenRequest:
    """What an engine needs to generate one completion (rendering happens in the engine)."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    """OpenAI's presence penalty, on the tokens generated so far (not the prompt's)."""
    frequency_penalty: float = 0.0
    """OpenAI's frequency penalty, on the tokens generated so far (not the prompt's)."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stream: bool = True
    """False: the client wants the whole completion, so the replica sends it as one delta."""
    deadline: float = 0.0
    """Wall-clock time (``time.time()``) at which the engine stops this request; 0: no deadline."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each token's, with the k most likely tokens at its position."""

    def sampling_error(self) -> str | None:
        return sampling_error(self.temperature, self.top_p, self.seed, self.max_tokens, self.penalties())

    def penalties(self) -> dict[str, float]:
        """The repetition penalties, by their OpenAI names."""
        return {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty}

    def past_deadline(self) -> bool:
        return bool(self.deadline) and time.time() >= self.deadline


@dataclass
class Delta:
    """A piece of generated text; the last one of a completion carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Why the engine could not run this request (the client's fault: a 400)."""
    param: str | None = None
    """The request field ``error`` is about."""
    stop_string: str | None = None
    """The client's stop string that ended the answer (the model did not end it itself)."""
    logprobs: list[dict] | None = None
    """When asked for: one OpenAI ``ChatCompletionTokenLogprob`` per token this delta adds (see :func:`token_logprob`)."""


def merge(a: "Delta", b: "Delta") -> "Delta":
    """``b`` appended to ``a``: text and log-probabilities joined, the latest counts, finish reason and stop
    string, the first error kept."""
    if a.error:
        return a
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return Delta(a.text + b.text, b.finish_reason or a.finish_reason, b.prompt_tokens or a.prompt_tokens,
                 b.completion_tokens or a.completion_tokens, b.error, b.param, b.stop_string or a.stop_string, logprobs)


def token_logprob(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    """OpenAI's ``ChatCompletionTokenLogprob``: the token's text, log-probability and UTF-8 bytes, and the
    most likely tokens at its position (``top``, most likely first)."""
    def one(text: str, lp: float) -> dict:
        return {"token": text, "logprob": max(float(lp), -9999.0), "bytes": list(text.encode("utf-8"))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}


async def deliver(deltas, stream: bool):
    """What a replica sends back for a request: every delta when streaming, else one merged delta.

    Each yielded item is one message between the replica and the ingress; a whole
    completion needs only one, not one per token.
    """
    async with aclosing(deltas):  # closing this stream closes the engine's: the request stops generating
        if stream:
            async for delta in deltas:
                yield delta
            return
        whole = None
        async for delta in deltas:
            whole = delta if whole is None else merge(whole, delta)
    if whole is not None:
        yield whole


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_body(cid: str, model: str, answers: list[tuple[dict, str, dict, list | None]], usage: dict) -> dict:
    """A non-streaming ``chat.completion`` object from ``(message, finish_reason, r2d, logprobs)`` per choice.

    ``r2d`` (the pivot metadata) is the first choice's; with several choices each carries its own too.
    ``logprobs``: the choice's token entries, or None when not asked for.
    """
    choices = [{"index": i, "message": message, "finish_reason": finish,
                "logprobs": None if lps is None else {"content": lps, "refusal": None},
                **({"r2d": meta} if len(answers) > 1 else {})}
               for i, (message, finish, meta, lps) in enumerate(answers)]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, "r2d": answers[0][2]}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               extra: dict | None = None, index: int = 0, logprobs: list | None = None) -> dict:
    """One ``chat.completion.chunk`` of a stream, for the choice ``index`` (``logprobs``: its tokens' entries)."""
    lps = None if logprobs is None else {"content": logprobs, "refusal": None}
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": lps}]}
    if extra:
        body.update(extra)
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
