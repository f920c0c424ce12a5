"""Train/eval contamination checks for prompt sets.

An evaluation prompt that also appears in the training traces (verbatim, or
with a word changed) measures memorisation, not robustness. These checks find
exact duplicates after normalisation and near duplicates by word 3-gram
overlap, and :func:`assert_held_out` turns a dirty report into an error.

Run the check on *base* prompts, before any jailbreak template is applied: two
different requests wrapped in the same long template share most of their
n-grams and would be flagged as near duplicates.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Any, Sequence

__all__ = [
    "ContaminationError",
    "assert_held_out",
    "check_contamination",
    "ngram_set",
    "normalize_prompt",
]

_N = 3
# Below this many n-grams, containment is too easy to reach by chance (a 4-word
# prompt has 2 trigrams), so only exact and Jaccard matches count.
_MIN_NGRAMS_FOR_CONTAINMENT = 3
_EXAMPLES = 3
_APOSTROPHES = ("'", "\u2019", "\u2018", "\u02bc")


class ContaminationError(ValueError):
    """Evaluation prompts overlap the training prompts."""


def normalize_prompt(text: str) -> str:
    """Normalise a prompt for duplicate detection.

    Unicode NFKC (so full-width and ligature forms compare equal), lowercase,
    apostrophes removed ("don't" → "dont", so contractions stay one word),
    other punctuation replaced by spaces, whitespace collapsed.

    Args:
        text: A prompt.

    Returns:
        The normalised prompt.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    for apostrophe in _APOSTROPHES:
        text = text.replace(apostrophe, "")
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def ngram_set(text: str, n: int = _N) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text.

    Args:
        text: A prompt.
        n: n-gram length in words.

    Returns:
        The set of n-grams; a text shorter than ``n`` words gives one shorter
        gram (so it can still match itself), an empty text gives an empty set.
    """
    words = normalize_prompt(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def check_contamination(
    eval_prompts: Sequence[str],
    train_prompts: Sequence[str],
    threshold: float = 0.6,
) -> dict[str, Any]:
    """Find evaluation prompts that duplicate or nearly duplicate training prompts.

    Exact: the normalised prompts are equal. Near: for some training prompt T
    and evaluation prompt E (as word 3-gram sets), Jaccard |E∩T|/|E∪T| ≥
    threshold, or containment |E∩T|/|E| ≥ threshold when E has at least 3
    n-grams. Containment rescues short prompts, where one changed word removes
    up to three of a handful of trigrams, and catches an eval prompt embedded in
    a longer training prompt.

    Candidates come from an inverted n-gram index with prefix filtering: a
    match needs |E∩T| ≥ ceil(threshold·|E|), so T must share one of E's
    |E| − ceil(threshold·|E|) + 1 rarest n-grams. Only those postings are read,
    which keeps common phrases ("how do i") from making the search quadratic.

    Args:
        eval_prompts: Evaluation prompts.
        train_prompts: Training prompts.
        threshold: Similarity at or above which a pair is a near duplicate.

    Returns:
        ``{"n_eval", "n_train", "threshold", "clean",
        "exact": {"count", "indices", "pairs"},
        "near": {"count", "indices", "matches"}, "examples"}``. Indices are eval
        indices; pairs and matches name the training index too; an exact
        duplicate is not also listed as near. ``examples`` quotes up to three.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    train_norm, train_sets, index = _index_train(train_prompts)
    exact_pairs, near_matches = [], []
    for i, prompt in enumerate(eval_prompts):
        j = train_norm.get(normalize_prompt(prompt))
        if j is not None:
            exact_pairs.append({"eval": i, "train": j})
            continue
        match = _best_near_match(ngram_set(prompt), train_sets, index, threshold)
        if match is not None:
            near_matches.append({"eval": i, **match})

    examples = [
        {**m, "eval_prompt": eval_prompts[m["eval"]], "train_prompt": train_prompts[m["train"]]}
        for m in (exact_pairs + near_matches)[:_EXAMPLES]
    ]
    return {
        "n_eval": len(eval_prompts),
        "n_train": len(train_prompts),
        "threshold": threshold,
        "clean": not exact_pairs and not near_matches,
        "exact": {"count": len(exact_pairs), "indices": [p["eval"] for p in exact_pairs], "pairs": exact_pairs},
        "near": {"count": len(near_matches), "indices": [m["eval"] for m in near_matches], "matches": near_matches},
        "examples": examples,
    }


def _index_train(train_prompts: Sequence[str]) -> tuple[dict, list, dict]:
    """Normalised text → first index, n-gram sets, and n-gram → posting list."""
    train_norm: dict[str, int] = {}
    for j, prompt in enumerate(train_prompts):
        train_norm.setdefault(normalize_prompt(prompt), j)
    train_sets = [ngram_set(p) for p in train_prompts]
    index: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for j, grams in enumerate(train_sets):
        for gram in grams:
            index[gram].append(j)
    return train_norm, train_sets, index


def _best_near_match(
    grams: set[tuple[str, ...]],
    train_sets: list[set[tuple[str, ...]]],
    index: dict[tuple[str, ...], list[int]],
    threshold: float,
) -> dict[str, Any] | None:
    """Most similar training prompt passing the threshold, or None."""
    if not grams:
        return None
    # Jaccard >= t implies containment >= t, so the containment bound is a
    # safe filter for both criteria. The epsilon keeps float error in t*|E|
    # from shortening the prefix (a shorter prefix could miss a match).
    need = max(1, math.ceil(threshold * len(grams) - 1e-9))
    prefix = sorted(grams, key=lambda g: (len(index.get(g, ())), g))[: len(grams) - need + 1]
    candidates: Counter[int] = Counter()
    for gram in prefix:
        candidates.update(index.get(gram, ()))

    best: dict[str, Any] | None = None
    for j in candidates:
        shared = len(grams & train_sets[j])
        jaccard = shared / len(grams | train_sets[j])
        containment = shared / len(grams)
        is_near = jaccard >= threshold or (
            containment >= threshold and len(grams) >= _MIN_NGRAMS_FOR_CONTAINMENT
        )
        if is_near and (best is None or (jaccard, containment) > (best["jaccard"], best["containment"])):
            best = {"train": j, "jaccard": round(jaccard, 4), "containment": round(containment, 4)}
    return best


def assert_held_out(report: dict[str, Any], allow: bool = False) -> dict[str, Any]:
    """Raise unless the contamination report is clean (or contamination is allowed).

    Args:
        report: Output of :func:`check_contamination`.
        allow: Accept a contaminated evaluation set (the caller must then
            report the counts alongside the results).

    Returns:
        The report, unchanged.

    Raises:
        ContaminationError: If the report is not clean and ``allow`` is False;
            the message gives the counts and up to three examples.
    """
    if report["clean"] or allow:
        return report
    lines = [
        f"{report['exact']['count']} exact and {report['near']['count']} near-duplicate "
        f"evaluation prompts (of {report['n_eval']}) overlap the training prompts "
        f"(threshold {report['threshold']}). Examples:"
    ]
    for ex in report["examples"]:
        lines.append(
            f"  eval[{ex['eval']}] {ex['eval_prompt'][:100]!r} ~ train[{ex['train']}] {ex['train_prompt'][:100]!r}"
        )
    lines.append("Remove them from one side, or pass allow=True and report the overlap.")
    raise ContaminationError("\n".join(lines))
