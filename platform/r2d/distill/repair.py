"""Repair and filter rules: which traces are kept, fixed, re-generated or dropped.

Harmful prompts:
- answered without a refusal → re-generate with the stronger instruction, up to
  ``distill.max_regenerations`` times;
- still answered → ``repair`` (the answer becomes a refusal naming what it refuses, closed
  by [UNSAFE], flagged ``repaired``) or ``drop``, per ``distill.on_unrepaired``.

Benign prompts:
- answered with a refusal, or with nothing usable (empty, cut off at ``max_tokens``,
  degenerate) → the row's ``reference`` answer when ``distill.use_references`` (flagged
  ``repaired``), else dropped.

Every drop has a reason; the manifest counts them.
"""

from __future__ import annotations

import re

from r2d.refusal import is_refusal

# Drop reasons, as counted in the manifest.
ENGINE_ERROR = "engine_error"
EMPTY_OUTPUT = "empty_output"
EMPTY_PROMPT = "empty_prompt"
MALFORMED = "malformed"
NO_PIVOTS = "no_pivots"
TOO_LONG = "too_long"
HARMFUL_ANSWERED = "harmful_answered"
BENIGN_REFUSAL = "benign_refusal"
BENIGN_UNUSABLE = "benign_unusable"
DROP_REASONS = (ENGINE_ERROR, EMPTY_OUTPUT, EMPTY_PROMPT, MALFORMED, NO_PIVOTS, TOO_LONG, HARMFUL_ANSWERED,
                BENIGN_REFUSAL, BENIGN_UNUSABLE)

_MIN_ANSWER_WORDS = 3


def answer_refuses(answer: str) -> bool:
    """A non-empty answer that refuses (an empty one delivers nothing, but is no refusal text)."""
    return bool(answer.strip()) and is_refusal(answer)


def degenerate(text: str) -> bool:
    """Looping output: a long answer with few distinct words (greedy 135M models do this)."""
    words = re.findall(r"\w+", text.lower())
    return len(words) >= 20 and len(set(words)) / len(words) < 0.3


def answer_unusable(answer: str, truncated: bool) -> bool:
    """Too short, cut off by the token limit, or looping: not an answer worth training on."""
    return truncated or len(answer.split()) < _MIN_ANSWER_WORDS or degenerate(answer)


def needs_regeneration(label: str, answer: str) -> bool:
    """A harmful prompt whose answer does not refuse (empty counts: it refuses nothing)."""
    return label == "harmful" and not answer_refuses(answer)


def decide_harmful(answer: str, on_unrepaired: str, refusal: str) -> tuple[str, str, bool]:
    """Final answer for a harmful prompt after the re-generations.

    Args:
        answer: the teacher's answer.
        on_unrepaired: ``repair`` or ``drop`` (``distill.on_unrepaired``).
        refusal: the refusal a repaired trace gets (:func:`r2d.distill.reasoning.refusal`).

    Returns:
        (action, answer, repaired) where action is ``keep``, ``repair`` or a drop reason.
    """
    if answer_refuses(answer):
        return "keep", answer, False
    if on_unrepaired == "repair":
        return "repair", refusal, True
    return HARMFUL_ANSWERED, answer, False


def decide_benign(answer: str, truncated: bool, reference: str, use_references: bool) -> tuple[str, str, bool]:
    """Final answer for a benign prompt: the teacher's when it helps, else the reference.

    Returns:
        (action, answer, repaired) where action is ``keep``, ``repair`` or a drop reason.
    """
    refused = answer_refuses(answer)
    if not refused and not answer_unusable(answer, truncated):
        return "keep", answer, False
    if use_references and reference.strip():
        return "repair", reference.strip(), True
    return (BENIGN_REFUSAL if refused else BENIGN_UNUSABLE), answer, False
