"""The guard-mode guarantee, as a property over generated outputs, cut-off points and stream chunkings.

The guarantee (r2d.serve.pivot_modes): no text of a step tagged [UNSAFE], and no text after
such a step that no pivot has closed yet, ever reaches the client. On top of that this
server withholds any text whose verdict the model never gave when the output was cut off
(max_tokens, a deadline), and what a stream sends adds up to the non-streaming answer.

Outputs are built from unique words (``⟨7⟩``), pivots and think tags in any order, so that
the oracle below can say, word by word, what the client must never see. Both paths are
checked: :func:`apply_mode` / :class:`GuardStream`, and the real FastAPI app's streaming and
non-streaming responses with an engine that replays the output in the drawn chunks.
"""

from __future__ import annotations

import json
import re

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import sse_events

from r2d.config import EngineConfig, ServeConfig
from r2d.pivots import RETHINK, SAFE, THINK_CLOSE, THINK_OPEN, UNSAFE
from r2d.serve.api import create_api
from r2d.serve.pivot_modes import GuardStream, apply_mode
from r2d.serve.schemas import Delta

_TOKEN = re.compile(r"⟨\d+⟩|\[SAFE\]|\[UNSAFE\]|\[RETHINK\]|<think>|</think>")
_PARTIAL_WORD = re.compile(r"⟨\d*(?!\d|⟩)")


@st.composite
def outputs(draw):
    """(raw text as the engine produced it, stopped by the model itself?, chunks it streamed in)."""
    kinds = st.sampled_from(["word"] * 4 + [SAFE, UNSAFE, UNSAFE, RETHINK, THINK_OPEN, THINK_CLOSE])
    parts = []
    for i, kind in enumerate(draw(st.lists(kinds, max_size=24))):
        parts.append(f"⟨{i}⟩" if kind == "word" else kind)
        parts.append(draw(st.sampled_from(["", " ", "\n", "\n\n"])))
    text = "".join(parts)
    cut = draw(st.none() | st.integers(0, len(text)))
    if cut is None:
        stopped = draw(st.booleans())  # the whole output: the model stopped, or max_tokens ended it exactly
    else:
        text, stopped = text[:cut], False
    bounds = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))) | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return text, stopped, chunks


def forbidden_words(text: str, stopped: bool) -> set[str]:
    """The words the client must never see, read token by token (independent of the implementation)."""
    forbidden, segment, unsafe_seen, closed_think = set(), [], False, False
    for token in _TOKEN.findall(text):
        if token.startswith("⟨"):
            segment.append(token)
        elif token in (SAFE, RETHINK, UNSAFE):
            if token == UNSAFE:
                forbidden.update(segment)  # a step tagged [UNSAFE]
                unsafe_seen = True
            segment = []
        elif token == THINK_CLOSE and not closed_think:  # </think> ends the last step, without a pivot
            closed_think = True
            if unsafe_seen:
                forbidden.update(segment)  # after an unsafe step, never closed by a pivot
            segment = []
    if unsafe_seen or not stopped:
        forbidden.update(segment)  # the unclosed tail: after an unsafe step, or cut off before its verdict
    return forbidden


def assert_nothing_forbidden(text: str, stopped: bool, shown: str) -> None:
    for word in forbidden_words(text, stopped):
        assert word not in shown, (word, text, shown)
    assert not _PARTIAL_WORD.search(shown), (text, shown)  # a word cut in half by max_tokens


@settings(max_examples=600, deadline=None, derandomize=True)
@given(outputs())
def test_guard_never_shows_unsafe_text(sample):
    text, stopped, chunks = sample
    result = apply_mode(text, "guard", stopped=stopped)
    assert_nothing_forbidden(text, stopped, f"{result.reasoning or ''}\n{result.content}")

    view, reasoning, content = GuardStream(), "", ""
    for chunk in chunks:
        r, c = view.feed(chunk)
        reasoning, content = reasoning + r, content + c
        assert_nothing_forbidden(text, stopped, reasoning + "\n" + content)
    r, c = view.feed("", final=True, stopped=stopped)
    assert (reasoning + r, content + c) == (result.reasoning or "", result.content)


class Replay:
    """An engine client that replays one output in the given chunks, then its finish reason."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.finish = "stop"

    def stream(self, req):
        chunks, finish = list(self.chunks), self.finish

        async def deltas():
            for chunk in chunks:
                yield Delta(chunk)
            yield Delta("", finish, 5, len(chunks))

        return deltas()

    async def close(self, stream) -> None:
        await stream.aclose()

    async def call(self, name, *args):
        return {"version": "replay"}


REPLAY = Replay()
API = TestClient(create_api(ServeConfig(mode="guard", api_key_env="", admin_key_env="", max_tokens_limit=64,
                                        default_max_tokens=8, engine=EngineConfig(max_model_len=256)), REPLAY))
BODY = {"messages": [{"role": "user", "content": "hi"}]}


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(outputs())
def test_guard_over_http_streaming_and_not(sample):
    text, stopped, chunks = sample
    REPLAY.chunks, REPLAY.finish = chunks, "stop" if stopped else "length"
    whole = API.post("/v1/chat/completions", json=BODY)
    assert whole.status_code == 200, whole.text
    message = whole.json()["choices"][0]["message"]
    assert_nothing_forbidden(text, stopped, json.dumps(message, ensure_ascii=False))

    streamed = API.post("/v1/chat/completions", json={**BODY, "stream": True})
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    assert_nothing_forbidden(text, stopped, streamed.text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e.get("choices")]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    assert (reasoning or None, content) == (message["reasoning_content"], message["content"])
