"""Request and response shapes of the OpenAI-compatible chat API.

Requests are validated strictly (``"5"`` is not an integer) so that wrong types
get a 422 naming the field. Unknown OpenAI parameters (``logprobs``, ``user``,
``tools``…) are ignored, as OpenAI's own server tolerates fields it does not
use; ``n > 1`` is rejected because one request yields one choice here.

Generation travels between the ingress and the engine as a :class:`GenRequest`
(plain dataclass: cheap to pickle through a Serve handle) and comes back as a
stream of :class:`Delta` items.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool"]


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

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    r2d_mode: str | None = None
    """Per-request pivot mode (show, hide, guard), limited to the server's allowed modes."""

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass
class GenRequest:
    """What an engine needs to generate one completion (rendering happens in the engine)."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    stream: bool = True
    """False: the client wants the whole completion, so the replica sends it as one delta."""


@dataclass
class Delta:
    """A piece of generated text; the last one of a completion carries ``finish_reason``."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Why the engine could not run this request (the client's fault: a 400)."""


def merge(a: "Delta", b: "Delta") -> "Delta":
    """``b`` appended to ``a``: text joined, the latest counts and finish reason, the first error kept."""
    if a.error:
        return a
    return Delta(a.text + b.text, b.finish_reason or a.finish_reason, b.prompt_tokens or a.prompt_tokens,
                 b.completion_tokens or a.completion_tokens, b.error)


async def deliver(deltas, stream: bool):
    """What a replica sends back for a request: every delta when streaming, else one merged delta.

    Each yielded item is one message between the replica and the ingress; a whole
    completion needs only one, not one per token.
    """
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


def completion_body(cid: str, model: str, message: dict, finish_reason: str, usage: dict, meta: dict) -> dict:
    """A non-streaming ``chat.completion`` object; ``r2d`` is the extra pivot metadata."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage, "r2d": meta}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               extra: dict | None = None) -> dict:
    """One ``chat.completion.chunk`` of a stream."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if extra:
        body.update(extra)
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
