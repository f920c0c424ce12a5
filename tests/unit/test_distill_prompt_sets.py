"""The prompt split distillation and evaluation share, and the balanced cap."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from r2d.config import load_config
from r2d.eval.contamination import check_contamination
from r2d.data.splits import (heldout_prompts, select_balanced, split_prompts, training_prompts,
                           without_near_duplicates)

TINY = Path(__file__).resolve().parents[2] / "jobs/configs/tiny.yaml"


def test_train_and_heldout_are_disjoint_and_stable():
    cfg = load_config(TINY)
    train, heldout = split_prompts(cfg)
    train_ids, held_ids = {r["prompt_id"] for r in train}, {r["prompt_id"] for r in heldout}
    assert train_ids and held_ids and not train_ids & held_ids
    assert len(train_ids) == len(train)  # no duplicates
    assert [r["prompt_id"] for r in training_prompts(cfg)] == [r["prompt_id"] for r in train]
    assert {r["prompt_id"] for r in heldout_prompts(cfg)} == held_ids
    assert 0.15 < len(heldout) / (len(train) + len(heldout)) < 0.35  # eval_fraction 0.25, plus near-dup moves


def test_heldout_side_holds_no_near_duplicate_of_a_training_prompt():
    cfg = load_config(TINY)
    train, heldout = split_prompts(cfg)
    report = check_contamination([r["prompt"] for r in heldout], [r["prompt"] for r in train],
                                 cfg.eval.contamination_threshold)
    assert report["clean"], report["examples"]

    rows = [{"prompt_id": "a", "prompt": "How do I remove a stripped screw from wood?"},
            {"prompt_id": "b", "prompt": "Write a haiku about autumn leaves."},
            {"prompt_id": "c", "prompt": "how do i remove a stripped screw from  wood"}]
    train_rows = [{"prompt_id": "t", "prompt": "How do I remove a stripped screw from wood, quickly?"}]
    assert [r["prompt_id"] for r in without_near_duplicates(rows, train_rows, 0.6)] == ["b"]


def test_max_prompts_never_moves_a_prompt_into_training():
    cfg = load_config(TINY)
    capped = load_config(TINY, ["data.max_prompts=20"])
    assert {r["prompt_id"] for r in heldout_prompts(capped)} == {r["prompt_id"] for r in heldout_prompts(cfg)}
    assert [r["prompt_id"] for r in training_prompts(capped)] == [r["prompt_id"] for r in training_prompts(cfg)][:20]


def test_select_balanced_alternates_labels():
    rows = [{"prompt_id": str(i), "label": "harmful" if i % 4 else "benign"} for i in range(40)]  # 30 h, 10 b
    chosen = select_balanced(rows, 16)
    assert Counter(r["label"] for r in chosen) == {"harmful": 8, "benign": 8}
    assert Counter(r["label"] for r in select_balanced(rows, 30)) == {"harmful": 20, "benign": 10}
    assert select_balanced(rows, 0) == rows
