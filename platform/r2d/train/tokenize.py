"""Traces rows → token ids, labels, segments: the training view of a conversation.

A traces row (see the traces dataset contract) becomes::

    input_ids  [T]  the whole conversation, rendered by the model's chat template
    labels     [T]  = input_ids on the assistant turn, IGNORE_INDEX elsewhere
    segment    [T]  1 inside <think>…</think>, 2 on the answer, 0 off the assistant turn

Labels are aligned with ``input_ids`` (not shifted); the training step shifts them
so that ``logits[:, t]`` predicts ``labels[:, t + 1]``. Pivot positions are simply
where ``labels`` equals a pivot id, so no separate mask can drift out of sync.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator

from r2d.losses import ANSWER, IGNORE_INDEX, REASONING
from r2d.pivots import PIVOTS, THINK_CLOSE, PivotIds, Trace, render_prefix_and_full

DROP_MALFORMED = "malformed"
DROP_TOO_LONG = "too_long"
DROP_NO_LABELS = "no_labels"


def _as_list(value: Any) -> list:
    # Parquet list columns arrive as numpy arrays or pyarrow scalars depending on the reader.
    if value is None:
        raise ValueError("missing")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return list(value)


def row_to_trace(row: dict) -> Trace:
    """Build a :class:`Trace` from a traces row.

    Raises:
        ValueError: naming the field that is missing or malformed.
    """
    try:
        steps = [str(s) for s in _as_list(row.get("reasoning_steps"))]
        pivots = [str(p) for p in _as_list(row.get("step_pivots"))]
    except ValueError as err:
        raise ValueError(f"reasoning_steps/step_pivots: {err}") from None
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: expected a non-empty string")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("answer: expected a non-empty string")
    if not steps or any(not s.strip() for s in steps):
        raise ValueError("reasoning_steps: expected a non-empty list of non-empty steps")
    answer_pivot = row.get("answer_pivot")
    if answer_pivot not in PIVOTS:
        raise ValueError(f"answer_pivot: got {answer_pivot!r}, expected one of {PIVOTS}")
    return Trace(steps, pivots, answer, answer_pivot)  # checks step/pivot counts and names


def _encode(tokenizer, text: str):
    # The chat template may already start with BOS (Llama 3, SmolLM2); adding another
    # would put two at the start. Otherwise let the tokenizer add what it always adds.
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)


def _truncate_at_pivot(ids: list[int], labels: list[int], max_length: int, pivot_set: set[int]) -> int | None:
    """Length to keep: everything, or up to and including the last labelled pivot that fits."""
    if len(ids) <= max_length:
        return len(ids)
    for t in range(max_length - 1, -1, -1):
        if labels[t] in pivot_set:
            return t + 1
    return None


def tokenize_row(tokenizer, row: dict, pivots: PivotIds, max_length: int,
                 system: str | None = None) -> tuple[dict | None, str | None]:
    """Tokenize one traces row for training.

    The full conversation is tokenized ONCE (never per part, which put BOS tokens
    mid-sequence in the reference code). Too long a conversation is cut right after
    the last pivot that fits, so every kept step keeps its pivot.

    Returns:
        ``(example, None)`` with ``input_ids``, ``labels``, ``segment`` (lists of ints)
        and ``length``; or ``(None, reason)`` for a dropped row: ``malformed``,
        ``too_long`` (not even the first step fits) or ``no_labels``.
    """
    try:
        trace = row_to_trace(row)
        prefix, full = render_prefix_and_full(tokenizer, row["prompt"], trace, system)
    except (ValueError, TypeError, KeyError):
        return None, DROP_MALFORMED
    enc = _encode(tokenizer, full)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    think_end = full.find(THINK_CLOSE, len(prefix)) + len(THINK_CLOSE)
    labels, segment = [], []
    for tok, (start, _end) in zip(ids, offsets):
        on_answer_turn = start >= len(prefix)
        labels.append(tok if on_answer_turn else IGNORE_INDEX)
        segment.append(0 if not on_answer_turn else REASONING if start < think_end else ANSWER)
    pivot_set = {pivots.safe, pivots.unsafe, pivots.rethink}
    keep = _truncate_at_pivot(ids, labels, max_length, pivot_set)
    if keep is None:
        return None, DROP_TOO_LONG
    if all(label == IGNORE_INDEX for label in labels[:keep]):
        return None, DROP_NO_LABELS
    return {"input_ids": ids[:keep], "labels": labels[:keep], "segment": segment[:keep], "length": keep}, None


def tokenize_rows(tokenizer, rows: Iterable[dict], pivots: PivotIds, max_length: int,
                  dropped: Counter, system: str | None = None) -> Iterator[dict]:
    """Tokenize a stream of rows, skipping bad ones and counting them in ``dropped`` by reason."""
    for row in rows:
        example, reason = tokenize_row(tokenizer, row, pivots, max_length, system)
        if example is None:
            dropped[reason] += 1
            continue
        yield example
