"""Tokenization for training: labels on the assistant turn only, one BOS, whole steps, pivots."""

from collections import Counter

import pytest

from r2d.losses import ANSWER, IGNORE_INDEX, REASONING
from r2d.models import load_tokenizer
from r2d.pivots import RETHINK, SAFE, UNSAFE, THINK_CLOSE, Trace, pivot_ids, render_assistant
from r2d.train.batching import collate, group_by_length
from r2d.train.synthetic import synthetic_rows
from r2d.train.tokenize import DROP_MALFORMED, DROP_TOO_LONG, tokenize_row, tokenize_rows


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled:smollm2-135m")


def _row(steps, pivots, answer="Here is the answer.", answer_pivot=SAFE, prompt="How do I bake bread?"):
    return {"prompt": prompt, "reasoning_steps": steps, "step_pivots": pivots, "answer": answer,
            "answer_pivot": answer_pivot, "label": "benign"}


ROW = _row(["The user wants a recipe.", "Baking is safe.", "I will list the steps."], [SAFE, SAFE, RETHINK])


def _labelled(example):
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def test_labels_cover_exactly_the_assistant_turn(tok):
    ex, reason = tokenize_row(tok, ROW, pivot_ids(tok), max_length=1024)
    assert reason is None
    text = tok.decode(_labelled(ex))
    trace = Trace(ROW["reasoning_steps"], ROW["step_pivots"], ROW["answer"], SAFE)
    # The assistant content plus the template's end-of-turn, nothing of the prompt or system.
    assert text.startswith(render_assistant(trace))
    assert text[len(render_assistant(trace)):].strip() == "<|im_end|>"
    assert "How do I bake bread?" not in text
    # Labels equal the inputs where set (unshifted; the step shifts them).
    assert all(lab == tid for lab, tid in zip(ex["labels"], ex["input_ids"]) if lab != IGNORE_INDEX)


def test_one_bos_at_the_start_and_none_mid_sequence(tok):
    ex, _ = tokenize_row(tok, ROW, pivot_ids(tok), max_length=1024)
    bos = tok.bos_token_id
    # SmolLM2's BOS is <|im_start|>, which the template also opens every turn with: count
    # the turns instead. 3 turns (system, user, assistant) -> exactly 3, the first at 0.
    starts = [i for i, t in enumerate(ex["input_ids"]) if t == bos]
    assert starts[0] == 0 and len(starts) == 3
    assert ex["input_ids"][1] != bos  # no doubled BOS from adding special tokens on top of the template


def test_pivot_positions_and_segments(tok):
    ids = pivot_ids(tok)
    ex, _ = tokenize_row(tok, ROW, ids, max_length=1024)
    pivots_at = [(i, t) for i, t in enumerate(ex["labels"]) if t in (ids.safe, ids.unsafe, ids.rethink)]
    assert [t for _, t in pivots_at] == [ids.safe, ids.safe, ids.rethink, ids.safe]  # 3 steps + answer
    close = ex["input_ids"].index(ids.think_close)
    for i, (label, seg) in enumerate(zip(ex["labels"], ex["segment"])):
        if label == IGNORE_INDEX:
            assert seg == 0
        else:
            assert seg == (REASONING if i <= close else ANSWER)
    assert ex["segment"][pivots_at[-1][0]] == ANSWER and ex["segment"][pivots_at[0][0]] == REASONING


def test_truncation_keeps_whole_steps(tok):
    ids = pivot_ids(tok)
    long_row = _row([f"Step number {i} explains one more detail of the method." for i in range(12)],
                    [SAFE] * 11 + [UNSAFE])
    full, _ = tokenize_row(tok, long_row, ids, max_length=4096)
    cut, reason = tokenize_row(tok, long_row, ids, max_length=full["length"] - 20)
    assert reason is None and cut["length"] <= full["length"] - 20
    assert cut["input_ids"] == full["input_ids"][:cut["length"]]
    # The kept text ends exactly on a pivot, and every kept step has its pivot.
    assert cut["labels"][-1] == ids.safe
    text = tok.decode(_labelled(cut))
    kept_steps = [s for s in long_row["reasoning_steps"] if s in text]
    assert 0 < len(kept_steps) < 12
    assert text.rstrip().endswith(f"{kept_steps[-1]} {SAFE}")
    assert THINK_CLOSE not in text


def test_rows_that_cannot_fit_or_are_malformed_are_dropped_and_counted(tok):
    ids = pivot_ids(tok)
    rows = [ROW,
            _row(["step"], [SAFE, SAFE]),                     # pivots do not match steps
            _row(["step"], ["[MAYBE]"]),                      # unknown pivot
            _row([], []),                                     # no steps
            _row(["step"], [SAFE], answer=""),               # empty answer
            {"prompt": "only a prompt"},                      # columns missing
            _row(["step"], [SAFE], prompt="word " * 400)]     # prompt alone exceeds max_length
    dropped = Counter()
    kept = list(tokenize_rows(tok, rows, ids, 256, dropped))
    assert len(kept) == 1
    assert dropped == {DROP_MALFORMED: 5, DROP_TOO_LONG: 1}


def test_length_grouping_cuts_padding(tok):
    ids = pivot_ids(tok)
    examples = list(tokenize_rows(tok, synthetic_rows(32), ids, 1024, Counter()))
    width = {}
    for grouped in (False, True):
        batches = list(group_by_length(examples, 4, seed=0, enabled=grouped))
        assert sorted(len(b) for b in batches) == [4] * 8
        width[grouped] = sum(collate(b, tok.pad_token_id)["input_ids"].numel() for b in batches)
    assert width[True] < width[False]
    odd = list(group_by_length(examples[:23], 4, seed=1))
    assert [len(b) for b in odd] == [4] * 5 + [3]  # the short remainder comes last, after the shuffle
    batch = collate(examples[:3], tok.pad_token_id)
    lengths = [e["length"] for e in examples[:3]]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
