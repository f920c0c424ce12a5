"""Pivot modes on real model-shaped strings: show, hide, guard, and the streaming view."""

from __future__ import annotations

import pytest

from r2d.serve.pivot_modes import REFUSAL, HideStream, apply_mode, guard_verdict, pivot_counts

SAFE_TEXT = ("<think>\nThe user wants a recipe. [SAFE]\nPancakes are harmless. [SAFE]\n</think>\n\n"
             "Mix flour and milk. [SAFE]")
UNSAFE_ANSWER = "<think>\nThey ask about explosives. [RETHINK]\n</think>\n\nStep 1: get nitrate. [UNSAFE]"
UNSAFE_REASONING_COMPLY = "<think>\nThis is a weapon request. [UNSAFE]\n</think>\n\nSure, here is how. [SAFE]"
UNSAFE_REASONING_REFUSE = "<think>\nThis is a weapon request. [UNSAFE]\n</think>\n\nI'm sorry, I can't help. [SAFE]"


def test_show_returns_raw_text_and_counts():
    result = apply_mode(SAFE_TEXT, "show")
    assert result.content == SAFE_TEXT
    assert result.pivots == {"safe": 3, "unsafe": 0, "rethink": 0}
    assert not result.guarded


def test_hide_strips_pivots_and_reasoning():
    result = apply_mode(SAFE_TEXT, "hide")
    assert result.content == "Mix flour and milk."
    assert result.reasoning == "The user wants a recipe.\nPancakes are harmless."
    assert "[" not in result.content and "think" not in result.content
    assert result.meta() == {"mode": "hide", "pivots": {"safe": 3, "unsafe": 0, "rethink": 0},
                             "guarded": False, "guard_reason": None}


def test_hide_does_not_guard_an_unsafe_answer():
    result = apply_mode(UNSAFE_ANSWER, "hide")
    assert result.content == "Step 1: get nitrate."
    assert not result.guarded


@pytest.mark.parametrize("text, reason", [
    (UNSAFE_ANSWER, "unsafe_answer"),
    (UNSAFE_REASONING_COMPLY, "unsafe_reasoning"),
    ("Here you go [UNSAFE]", "unsafe_answer"),  # no reasoning at all: the whole text is the answer
    (UNSAFE_REASONING_REFUSE, None),  # the reasoning turned unsafe, and the answer refused: fine
    (SAFE_TEXT, None),
    ("<think>\nstep [UNSAFE]\nstill thinking", None),  # unclosed: nothing visible, nothing to guard
])
def test_guard_verdict(text, reason):
    assert guard_verdict(text) == reason


def test_guard_replaces_the_answer_and_withholds_reasoning():
    result = apply_mode(UNSAFE_ANSWER, "guard")
    assert result.content == REFUSAL
    assert result.reasoning is None
    assert result.guarded and result.guard_reason == "unsafe_answer"
    assert result.pivots == {"safe": 0, "unsafe": 1, "rethink": 1}


def test_guard_passes_safe_text_like_hide():
    assert apply_mode(SAFE_TEXT, "guard").content == apply_mode(SAFE_TEXT, "hide").content


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        apply_mode(SAFE_TEXT, "raw")


def test_pivot_counts_plain_names():
    assert pivot_counts("a [SAFE] b [RETHINK] c [RETHINK]") == {"safe": 1, "unsafe": 0, "rethink": 2}


@pytest.mark.parametrize("text", [SAFE_TEXT, UNSAFE_ANSWER, "plain answer without tags", "<think>\nhalf [SAFE]"])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_hide_stream_equals_non_streaming(text, size):
    """Fed in pieces of any size (tags split across pieces too), the stream adds up to the hide view."""
    view, reasoning, content = HideStream(), "", ""
    for start in range(0, len(text), size):
        r, c = view.feed(text[start:start + size])
        reasoning, content = reasoning + r, content + c
        assert "[" not in c and "<" not in c
    r, c = view.feed("", final=True)
    expected = apply_mode(text, "hide")
    assert reasoning + r == (expected.reasoning or "")
    assert content + c == expected.content
