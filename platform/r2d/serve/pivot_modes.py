"""Pivot-aware safety modes: what a client sees of the model's raw output.

- ``show``: the raw text, pivots and ``<think>`` included.
- ``hide``: the visible answer only; the reasoning (pivots removed) goes to
  ``reasoning_content``/``reasoning``.
- ``guard``: the safety boundary. Its guarantee, for any output and any cut-off point,
  streaming or not: **no text of a step tagged** ``[UNSAFE]`` **and no text after such a
  step that no pivot has closed yet ever reaches the client.** How:

  * The text is cut into *segments*, each ended by a pivot; ``</think>`` also ends one
    (the reasoning's last step, if it has no pivot).
  * Reasoning: a step is shown only once a pivot closes it. ``[SAFE]``/``[RETHINK]`` steps
    are shown without their pivot; an ``[UNSAFE]`` step is replaced by :data:`REDACTED`;
    a step without a pivot (cut off, or ended by ``</think>``) is never shown.
  * Answer: decided only when the generation has ended. It becomes :data:`REFUSAL` when it
    carries ``[UNSAFE]`` or when the reasoning's last pivot is ``[UNSAFE]`` (the model never
    changed course). Otherwise its pivot-closed part is shown; the text after its last pivot
    is shown only when the model ended the output itself (finish reason ``stop``) and no
    step before it was unsafe, so a small ``max_tokens`` cannot expose an answer before the
    model has judged it.

  Streaming (:class:`GuardStream`) sends each reasoning step as it closes and the answer
  once at the end; what it sends adds up exactly to :func:`apply_mode`'s result.

Pure functions on strings, so they are tested without a model or Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from r2d.pivots import (PIVOTS, RETHINK, SAFE, THINK_CLOSE, THINK_OPEN, UNSAFE, answer_part, count_pivots,
                        split_reasoning, strip_pivots)

MODES = ("show", "hide", "guard")
STRENGTH = {"show": 0, "hide": 1, "guard": 2}
"""How much of the raw output a mode withholds: a request may lower it only with the admin key."""
REFUSAL = "I'm sorry, but I can't help with that."
REDACTED = "[unsafe step withheld]"
"""What guard sends in place of a reasoning step the model tagged [UNSAFE]."""
_PIVOT_RE = re.compile("|".join(re.escape(p) for p in PIVOTS))
_TAGS = (*PIVOTS, THINK_OPEN, THINK_CLOSE)
_KEYS = {SAFE: "safe", UNSAFE: "unsafe", RETHINK: "rethink"}


@dataclass
class ModeResult:
    """What a response carries for one completion."""

    mode: str
    content: str
    reasoning: str | None
    guarded: bool = False
    guard_reason: str | None = None
    pivots: dict[str, int] = field(default_factory=dict)
    redacted: int = 0
    """Reasoning steps guard replaced by :data:`REDACTED`."""

    def meta(self) -> dict:
        """The ``r2d`` metadata object of a response."""
        return {"mode": self.mode, "pivots": self.pivots, "guarded": self.guarded, "guard_reason": self.guard_reason,
                "redacted_steps": self.redacted}


def pivot_counts(text: str) -> dict[str, int]:
    """Pivot counts keyed by plain names: ``{"safe": n, "unsafe": n, "rethink": n}``."""
    return {_KEYS[p]: n for p, n in count_pivots(text).items()}


# ---------------------------------------------------------------- guard

@dataclass
class GuardView:
    """What guard may show of a (possibly still growing) output."""

    reasoning: str
    """Pivot-closed reasoning steps, one per line; [UNSAFE] ones as :data:`REDACTED`."""
    content: str | None
    """The answer; None until the output has ended."""
    reason: str | None = None
    """Why guard replaced or withheld (part of) the answer; None when it passed whole."""
    redacted: int = 0


def _segments(text: str) -> list[tuple[str, str | None]]:
    """``text`` cut after every pivot: (segment text, its pivot or None for an unclosed tail)."""
    out, position = [], 0
    for match in _PIVOT_RE.finditer(text):
        out.append((text[position:match.start()], match.group()))
        position = match.end()
    if text[position:].strip():
        out.append((text[position:], None))
    return out


def _clean(text: str) -> str:
    return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


def guard_view(text: str, final: bool, stopped: bool = False) -> GuardView:
    """The guard view of ``text``.

    Args:
        text: the raw output so far.
        final: the output has ended (no more text will come).
        stopped: the model ended it itself (finish reason ``stop``), not ``max_tokens`` or a deadline.

    Growing ``text`` (``final`` False) only ever extends the reasoning it returns, so a
    stream can send the difference; the answer is decided once, when ``final``.
    """
    if not final:
        text = text[:len(text) - _held_back(text)]
    close = text.find(THINK_CLOSE)
    if close >= 0:
        reasoning_raw, answer_raw = text[:close], text[close + len(THINK_CLOSE):]
    elif THINK_OPEN in text:
        reasoning_raw, answer_raw = text, ""
    elif final:
        reasoning_raw, answer_raw = "", text
    else:
        return GuardView("", None)  # no tag yet: reasoning or answer cannot be told apart
    steps = [(t, p) for t, p in _segments(reasoning_raw.replace(THINK_OPEN, "")) if p is not None]
    lines = [REDACTED if p == UNSAFE else _clean(t) for t, p in steps]
    reasoning = "\n".join(line for line in lines if line)
    redacted = sum(p == UNSAFE for _, p in steps)
    if not final:
        return GuardView(reasoning, None, None, redacted)
    content, reason = _guard_answer(answer_raw, [p for _, p in steps], stopped)
    return GuardView(reasoning, content, reason, redacted)


def _guard_answer(answer_raw: str, reasoning_pivots: list[str], stopped: bool) -> tuple[str, str | None]:
    found = list(_PIVOT_RE.finditer(answer_raw))
    if any(m.group() == UNSAFE for m in found):
        return REFUSAL, "unsafe_answer"
    if reasoning_pivots and reasoning_pivots[-1] == UNSAFE:
        return REFUSAL, "unsafe_reasoning"
    unsafe_before = UNSAFE in reasoning_pivots
    closed_end = found[-1].end() if found else 0
    withhold_tail = bool(answer_raw[closed_end:].strip()) and (unsafe_before or not stopped)
    content = strip_pivots(answer_part(answer_raw[:closed_end] if withhold_tail else answer_raw))
    if not withhold_tail:
        return content, None
    if unsafe_before:
        return (content or REFUSAL), "unclosed_after_unsafe"
    return content, "unclosed_answer"


# ---------------------------------------------------------------- modes

def apply_mode(text: str, mode: str, stopped: bool = False) -> ModeResult:
    """Turn a complete raw completion into what the client sees under ``mode``.

    Args:
        text: the raw output.
        mode: show, hide or guard.
        stopped: the model ended the output itself (finish reason ``stop``); see :func:`guard_view`.
    """
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
    counts = pivot_counts(text)
    if mode == "show":
        return ModeResult(mode, text, None, pivots=counts)
    if mode == "guard":
        view = guard_view(text, final=True, stopped=stopped)
        return ModeResult(mode, view.content or "", view.reasoning or None, view.reason is not None, view.reason,
                          counts, view.redacted)
    reasoning, answer = split_reasoning(text)
    return ModeResult(mode, answer, reasoning or None, pivots=counts)


def _held_back(text: str) -> int:
    """Length of a tail that may be the start of a tag (``[SAF``, ``</thi``): not safe to show yet."""
    for cut in range(min(len(text), max(map(len, _TAGS)) - 1), 0, -1):
        tail = text[-cut:]
        if any(tag.startswith(tail) and tag != tail for tag in _TAGS):
            return cut
    return 0


class _DeltaView:
    """Send only what extends what was already sent, for views that grow as text arrives."""

    def __init__(self) -> None:
        self.raw = ""
        self._sent = {"reasoning": "", "content": ""}

    def _advance(self, key: str, view: str) -> str:
        sent = self._sent[key]
        if not view.startswith(sent):
            return ""  # a view shrank (e.g. stripped whitespace); wait for it to grow past what was sent
        self._sent[key] = view
        return view[len(sent):]


class HideStream(_DeltaView):
    """Incremental ``hide`` view of a growing raw text: yields reasoning and content deltas.

    Each step recomputes both views from the whole text so far (the same
    :func:`split_reasoning` as the non-streaming path) and emits only what extends
    what was already sent; a tail that could still become a tag is held back.
    """

    def feed(self, delta: str, final: bool = False, stopped: bool = False) -> tuple[str, str]:
        """Add raw text; return (reasoning delta, content delta)."""
        self.raw += delta
        text = self.raw if final else self.raw[:len(self.raw) - _held_back(self.raw)]
        reasoning, content = split_reasoning(text)
        return self._advance("reasoning", reasoning), self._advance("content", content)


class GuardStream(_DeltaView):
    """Incremental ``guard`` view: reasoning steps as their pivots close them, the answer at the end.

    What it sends adds up to :func:`apply_mode` (guard) of the whole text, because both
    are :func:`guard_view`, and a growing text only extends the reasoning that view returns.
    """

    def feed(self, delta: str, final: bool = False, stopped: bool = False) -> tuple[str, str]:
        """Add raw text; return (reasoning delta, content delta)."""
        self.raw += delta
        view = guard_view(self.raw, final, stopped)
        reasoning = self._advance("reasoning", view.reasoning)
        content = self._advance("content", view.content) if view.content is not None else ""
        return reasoning, content
