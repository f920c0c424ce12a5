"""Pivot-aware safety modes: what a client sees of the model's raw output.

- ``show``: the raw text, pivots and ``<think>`` included.
- ``hide``: the visible answer only; the reasoning (pivots removed) goes to
  ``reasoning_content``/``reasoning``.
- ``guard``: ``hide``, but the answer is replaced by a refusal when the answer part
  carries ``[UNSAFE]``, or when the reasoning's last pivot is ``[UNSAFE]`` and the
  answer is not already a refusal. The response says so (``guarded``), and the
  reasoning is withheld: it is where the unsafe steps were.

Pure functions on strings, so they are tested without a model or Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from r2d.refusal import is_refusal
from r2d.pivots import (PIVOTS, RETHINK, SAFE, THINK_CLOSE, THINK_OPEN, UNSAFE, count_pivots, raw_parts,
                        split_reasoning)

MODES = ("show", "hide", "guard")
REFUSAL = "I'm sorry, but I can't help with that."
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

    def meta(self) -> dict:
        """The ``r2d`` metadata object of a response."""
        return {"mode": self.mode, "pivots": self.pivots, "guarded": self.guarded, "guard_reason": self.guard_reason}


def pivot_counts(text: str) -> dict[str, int]:
    """Pivot counts keyed by plain names: ``{"safe": n, "unsafe": n, "rethink": n}``."""
    return {_KEYS[p]: n for p, n in count_pivots(text).items()}


def guard_verdict(text: str) -> str | None:
    """Why ``guard`` must refuse this raw output, or None when it may pass.

    Returns:
        ``"unsafe_answer"`` when the answer part carries ``[UNSAFE]``;
        ``"unsafe_reasoning"`` when the reasoning's last pivot is ``[UNSAFE]`` and
        the visible answer is not a refusal; otherwise None.
    """
    reasoning, answer = raw_parts(text)
    if UNSAFE in answer:
        return "unsafe_answer"
    steps = _PIVOT_RE.findall(reasoning)
    if steps and steps[-1] == UNSAFE and not is_refusal(text):
        return "unsafe_reasoning"
    return None


def apply_mode(text: str, mode: str) -> ModeResult:
    """Turn a raw completion into what the client sees under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
    counts = pivot_counts(text)
    if mode == "show":
        return ModeResult(mode, text, None, pivots=counts)
    reasoning, answer = split_reasoning(text)
    if mode == "guard":
        reason = guard_verdict(text)
        if reason is not None:
            return ModeResult(mode, REFUSAL, None, True, reason, counts)
    return ModeResult(mode, answer, reasoning or None, pivots=counts)


def _held_back(text: str) -> int:
    """Length of a tail that may be the start of a tag (``[SAF``, ``</thi``): not safe to show yet."""
    for cut in range(min(len(text), max(map(len, _TAGS)) - 1), 0, -1):
        tail = text[-cut:]
        if any(tag.startswith(tail) and tag != tail for tag in _TAGS):
            return cut
    return 0


class HideStream:
    """Incremental ``hide`` view of a growing raw text: yields reasoning and content deltas.

    Each step recomputes both views from the whole text so far (the same
    :func:`split_reasoning` as the non-streaming path) and emits only what extends
    what was already sent; a tail that could still become a tag is held back.
    """

    def __init__(self) -> None:
        self.raw = ""
        self._sent_reasoning = ""
        self._sent_content = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Add raw text; return (reasoning delta, content delta)."""
        self.raw += delta
        text = self.raw if final else self.raw[:len(self.raw) - _held_back(self.raw)]
        reasoning, content = split_reasoning(text)
        return self._advance("_sent_reasoning", reasoning), self._advance("_sent_content", content)

    def _advance(self, attr: str, view: str) -> str:
        sent = getattr(self, attr)
        if not view.startswith(sent):
            return ""  # a view shrank (e.g. stripped whitespace); wait for it to grow past what was sent
        setattr(self, attr, view)
        return view[len(sent):]
