"""Pivot modes on real model-shaped strings: show, hide, guard, and the streaming views."""

from __future__ import annotations

import pytest

from r2d.serve.pivot_modes import REDACTED, REFUSAL, GuardStream, HideStream, apply_mode, pivot_counts

SAFE_TEXT = ("<think>\nThe user wants a recipe. [SAFE]\nPancakes are harmless. [SAFE]\n</think>\n\n"
             "Mix flour and milk. [SAFE]")
UNSAFE_ANSWER = "<think>\nThey ask about explosives. [RETHINK]\n</think>\n\nStep 1: get nitrate. [UNSAFE]"
UNSAFE_REASONING_COMPLY = "<think>\nThis is a weapon request. [UNSAFE]\n</think>\n\nSure, here is how. [SAFE]"
UNSAFE_REASONING_REFUSE = "<think>\nThis is a weapon request. [UNSAFE]\n</think>\n\nI'm sorry, I can't help. [SAFE]"
# The answer closes the reasoning again and re-opens it (the tiny student does): no tag may reach the user.
RECLOSED = ("<think>\nIt acts on a gun. [SAFE]\n</think>\n\nA ghost gun is a gun. [SAFE]\n</think> It acts. [SAFE] "
            "<think> more [SAFE] </think> End. [SAFE]")


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
                             "guarded": False, "guard_reason": None, "redacted_steps": 0}


def test_hide_does_not_guard_an_unsafe_answer():
    result = apply_mode(UNSAFE_ANSWER, "hide")
    assert result.content == "Step 1: get nitrate."
    assert not result.guarded


@pytest.mark.parametrize("text, stopped, reasoning, content, reason", [
    # the answer itself is unsafe: refused; the reasoning before it was safe and is shown
    (UNSAFE_ANSWER, True, "They ask about explosives.", REFUSAL, "unsafe_answer"),
    # the reasoning ended on [UNSAFE] and the model answered anyway: refused, the step redacted
    (UNSAFE_REASONING_COMPLY, True, REDACTED, REFUSAL, "unsafe_reasoning"),
    # ...and also when the answer looks like a refusal: a refusal phrase is no key to the reasoning
    ("<think>\nHow to build it: wire X to Y [UNSAFE]\n</think>\n\nI'm sorry, here is more: wire Z [SAFE]", True,
     REDACTED, REFUSAL, "unsafe_reasoning"),
    (UNSAFE_REASONING_REFUSE, True, REDACTED, REFUSAL, "unsafe_reasoning"),
    # no reasoning at all: the whole text is the answer
    ("Here you go [UNSAFE]", True, None, REFUSAL, "unsafe_answer"),
    # the model's normal safe pattern: unsafe step, then a course change; the step is redacted,
    # and an answer with no closing pivot after it is withheld
    ("<think>\nMix A and B to get the toxin [UNSAFE]\nThat would hurt people [RETHINK]\n</think>\n\nI can't help",
     True, f"{REDACTED}\nThat would hurt people", REFUSAL, "unclosed_after_unsafe"),
    ("<think>\nMix A and B to get the toxin [UNSAFE]\nThat would hurt people [RETHINK]\n</think>\n\n"
     "I can't help with that. [SAFE]", True, f"{REDACTED}\nThat would hurt people", "I can't help with that.", None),
    # cut off inside the reasoning (a small max_tokens): closed steps only, unsafe ones redacted
    ("<think>\nStep one is fine [SAFE]\nthe recipe: nitrate and [UNSAFE]\nthen heat it to", False,
     f"Step one is fine\n{REDACTED}", REFUSAL, "unsafe_reasoning"),
    ("<think>\nStep one is fine [SAFE]\nthe recipe: nitrate and", False, "Step one is fine", "", None),
    # cut off inside the answer before its pivot: the unjudged answer is withheld
    ("<think>\nok [SAFE]\n</think>\n\nStep 1: get nitr", False, "ok", "", "unclosed_answer"),
    # a model without pivots that ended its answer itself: nothing to guard, passed as hide would
    ("a plain answer", True, None, "a plain answer", None),
    (SAFE_TEXT, False, "The user wants a recipe.\nPancakes are harmless.", "Mix flour and milk.", None),
])
def test_guard(text, stopped, reasoning, content, reason):
    result = apply_mode(text, "guard", stopped=stopped)
    assert (result.reasoning, result.content, result.guard_reason) == (reasoning, content, reason)
    assert result.guarded == (reason is not None)


def test_guard_passes_safe_text_like_hide():
    guarded, hidden = apply_mode(SAFE_TEXT, "guard", stopped=True), apply_mode(SAFE_TEXT, "hide")
    assert (guarded.content, guarded.reasoning) == (hidden.content, hidden.reasoning)


def test_guard_meta_counts_redacted_steps():
    result = apply_mode("<think> a [UNSAFE] b [UNSAFE] c [RETHINK] </think> No. [SAFE]", "guard", stopped=True)
    assert result.meta() == {"mode": "guard", "pivots": {"safe": 1, "unsafe": 2, "rethink": 1}, "guarded": False,
                             "guard_reason": None, "redacted_steps": 2}
    assert result.reasoning == f"{REDACTED}\n{REDACTED}\nc" and result.content == "No."


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        apply_mode(SAFE_TEXT, "raw")


def test_pivot_counts_plain_names():
    assert pivot_counts("a [SAFE] b [RETHINK] c [RETHINK]") == {"safe": 1, "unsafe": 0, "rethink": 2}


@pytest.mark.parametrize("text", [SAFE_TEXT, UNSAFE_ANSWER, "plain answer without tags", "<think>\nhalf [SAFE]",
                                  RECLOSED])
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


def test_guard_stream_sends_steps_as_they_close_and_the_answer_last():
    view = GuardStream()
    assert view.feed("<think>\nfine step ") == ("", "")  # no pivot yet: nothing leaves
    assert view.feed("[SAF") == ("", "")  # half a pivot is not a pivot
    assert view.feed("E]\nthe recipe: nitrate") == ("fine step", "")
    assert view.feed(" [UNSAFE]\n") == (f"\n{REDACTED}", "")
    assert view.feed("no [RETHINK]</think> I can't help. [SAFE]") == ("\nno", "")  # the answer waits for the end
    assert view.feed("", final=True, stopped=True) == ("", "I can't help.")


@pytest.mark.parametrize("mode", ["hide", "guard"])
def test_an_answer_that_closes_its_reasoning_again_is_shown_without_tags(mode):
    result = apply_mode(RECLOSED, mode, stopped=True)
    assert result.content == "A ghost gun is a gun.\nIt acts. End." and not result.guarded


def test_guard_still_refuses_an_unsafe_pivot_inside_reopened_reasoning():
    """Dropping re-opened reasoning from what is shown must not hide its verdict from guard."""
    result = apply_mode(RECLOSED.replace("more [SAFE]", "more [UNSAFE]"), "guard", stopped=True)
    assert result.guarded and result.guard_reason == "unsafe_answer" and result.content == REFUSAL
