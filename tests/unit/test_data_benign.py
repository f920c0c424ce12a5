"""The shipped benign prompt set: size, look-alikes, references, no duplicates."""

import itertools
import json
from importlib import resources

import pytest

from r2d.data.dedup import jaccard
from r2d.data.dedup import ngrams as word_ngrams
from r2d.data.prompts import ROW_KEYS, prompt_id
from r2d.data.sources import load_benign


@pytest.fixture(scope="module")
def records():
    text = resources.files("r2d.data").joinpath("benign.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_size_and_lookalike_count(records):
    assert len(records) >= 320
    assert sum(r["lookalike"] for r in records) >= 100


def test_every_row_has_the_fields_and_a_real_reference(records):
    for r in records:
        assert set(r) == {"prompt", "category", "lookalike", "reference", "intent", "target", "deciding"}, r
        assert isinstance(r["lookalike"], bool)
        assert r["prompt"].strip() and r["category"].strip(), r
        # A reference is a short, genuine answer: not empty, not a placeholder, not an essay.
        assert 20 <= len(r["reference"].strip()) <= 800, r["prompt"]


def test_lookalike_flag_matches_category(records):
    for r in records:
        assert r["lookalike"] == r["category"].startswith("lookalike-"), r["prompt"]


def test_no_duplicate_or_near_duplicate_prompts(records):
    ids = [prompt_id(r["prompt"]) for r in records]
    assert len(set(ids)) == len(ids)
    grams = [word_ngrams(r["prompt"]) for r in records]
    close = [(records[i]["prompt"], records[j]["prompt"])
             for i, j in itertools.combinations(range(len(records)), 2)
             if jaccard(grams[i], grams[j]) >= 0.6]
    assert close == []


def test_topics_are_varied(records):
    plain = {r["category"] for r in records if not r["lookalike"]}
    lookalike = {r["category"] for r in records if r["lookalike"]}
    assert len(plain) >= 10 and len(lookalike) >= 10


def test_load_benign_filters_and_schema(records):
    every, yes, no = load_benign(), load_benign(lookalike=True), load_benign(lookalike=False)
    assert len(every) == len(records) == len(yes) + len(no)
    assert all(r["lookalike"] for r in yes) and not any(r["lookalike"] for r in no)
    for row in every:
        assert tuple(row) == ROW_KEYS
        assert row["label"] == "benign" and row["source"] == "benign" and row["reference"]
        assert row["attack"] == "none"
