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

from typing import Any, Sequence

from r2d.data.dedup import THRESHOLD, NgramIndex

__all__ = ["ContaminationError", "assert_held_out", "check_contamination"]

_EXAMPLES = 3


class ContaminationError(ValueError):
    """Evaluation prompts overlap the training prompts."""


def check_contamination(
    eval_prompts: Sequence[str],
    train_prompts: Sequence[str],
    threshold: float = THRESHOLD,
) -> dict[str, Any]:
    """Find evaluation prompts that duplicate or nearly duplicate training prompts.

    Exact: equal in comparison form. Near: Jaccard or containment of word 3-grams
    at or above ``threshold`` (:mod:`r2d.data.dedup`, the measure the split uses).

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
    index = NgramIndex(train_prompts)
    exact_pairs, near_matches = [], []
    for i, prompt in enumerate(eval_prompts):
        j = index.exact_match(prompt)
        if j is not None:
            exact_pairs.append({"eval": i, "train": j})
            continue
        match = index.best_match(prompt, threshold)
        if match is not None:
            near_matches.append({"eval": i, "train": match.index, "jaccard": match.jaccard,
                                 "containment": match.containment})

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
