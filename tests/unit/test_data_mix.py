"""Mixing sources and the train/eval split, with its near-duplicate guard."""

import itertools
import random
from collections import Counter

import pytest

from r2d.data.dedup import jaccard
from r2d.data.dedup import ngrams as word_ngrams
from r2d.data.mix import mix, split
from r2d.data.prompts import make_row


def _rows(source, n, start=0, label="benign"):
    return [make_row(f"{source} prompt number {i} about topic {i * 7 % 13}", source, label)
            for i in range(start, start + n)]


def _random_rows(n, rng, vocab_prefix="w", vocab=5000, length=(6, 20)):
    return [make_row(" ".join(f"{vocab_prefix}{rng.randrange(vocab)}"
                              for _ in range(rng.randint(*length))), "r", "benign")
            for _ in range(n)]


def _ids(rows):
    return [r["prompt_id"] for r in rows]


# ------------------------------------------------------------------ n-grams


def test_word_ngrams_and_jaccard_by_hand():
    # "The cat sat on the mat" -> the cat sat | cat sat on | sat on the | on the mat
    assert word_ngrams("The cat  sat on the MAT!") == {
        "the cat sat", "cat sat on", "sat on the", "on the mat"}
    assert word_ngrams("Hi there") == {"hi there"}  # shorter than 3 words: one gram
    assert word_ngrams("?!") == frozenset()
    # {a b c, b c d} vs {b c d, c d e}: 1 shared of 3 distinct.
    assert jaccard(word_ngrams("a b c d"), word_ngrams("b c d e")) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 0.0


# ------------------------------------------------------------------ mix


def test_mix_sizes_exact_and_deterministic():
    a, b = _rows("a", 50), _rows("b", 80)
    out = mix([a, b], sizes=[10, 25], seed=3)
    assert Counter(r["source"] for r in out) == {"a": 10, "b": 25}
    assert _ids(out) == _ids(mix([a, b], sizes=[10, 25], seed=3))
    assert set(_ids(out)) != set(_ids(mix([a, b], sizes=[10, 25], seed=4)))


def test_mix_ignores_input_order():
    a, b = _rows("a", 50), _rows("b", 80)
    shuffled = [list(reversed(a)), random.Random(0).sample(b, len(b))]
    assert _ids(mix([a, b], sizes=[10, 25], seed=1)) == _ids(mix(shuffled, sizes=[10, 25], seed=1))


def test_mix_ratios_with_total_use_largest_remainder():
    a, b, c = _rows("a", 40), _rows("b", 40), _rows("c", 40)
    out = mix([a, b, c], ratios=[1, 1, 2], total=10, seed=0)
    # shares 2.5, 2.5, 5 -> floors 2, 2, 5; the one left goes to the first tied remainder.
    assert Counter(r["source"] for r in out) == {"a": 3, "b": 2, "c": 5}


def test_mix_ratios_without_total_take_as_much_as_the_smallest_source_allows():
    out = mix([_rows("a", 10), _rows("b", 100)], ratios=[0.5, 0.5], seed=0)
    assert Counter(r["source"] for r in out) == {"a": 10, "b": 10}
    out = mix([_rows("a", 10), _rows("b", 100)], ratios=[1, 3], seed=0)
    assert Counter(r["source"] for r in out) == {"a": 10, "b": 30}


def test_mix_deduplicates_exact_copies_across_and_within_sources():
    a = _rows("a", 20)
    # b repeats every prompt of a (re-cased, so only the normalised id matches) and itself.
    copies = [make_row(r["prompt"].upper(), "b", "benign") for r in a]
    b = copies + copies + _rows("b", 30)
    out = mix([a, b], sizes=[20, 30], seed=0)
    assert len(out) == len(set(_ids(out))) == 50
    assert Counter(r["source"] for r in out) == {"a": 20, "b": 30}


def test_mix_rejects_bad_requests():
    a = _rows("a", 5)
    with pytest.raises(ValueError, match="6 rows, 5 unique"):
        mix([a], sizes=[6])
    with pytest.raises(ValueError, match="exactly one"):
        mix([a], sizes=[1], ratios=[1])
    with pytest.raises(ValueError, match="exactly one"):
        mix([a])
    with pytest.raises(ValueError, match="2 sizes/ratios for 1 sources"):
        mix([a], sizes=[1, 2])
    with pytest.raises(ValueError, match="ratios"):
        mix([a], ratios=[0])


# ------------------------------------------------------------------ split


def test_split_is_deterministic_and_near_the_fraction():
    rows = _random_rows(4000, random.Random(0))
    train, evals = split(rows, 0.2, seed=7)
    assert (_ids(train), _ids(evals)) == tuple(map(_ids, split(rows, 0.2, seed=7)))
    assert len(train) + len(evals) == len(rows)
    assert 0.18 < len(evals) / len(rows) < 0.22
    assert set(_ids(evals)) != set(_ids(split(rows, 0.2, seed=8)[1]))


def test_split_extremes_and_validation():
    rows = _random_rows(50, random.Random(1))
    assert split(rows, 0.0) == (rows, [])
    assert split(rows, 1.0) == ([], rows)
    with pytest.raises(ValueError, match="eval_fraction"):
        split(rows, 1.5)


def test_adding_rows_does_not_move_existing_prompts():
    rng = random.Random(2)
    old = _random_rows(1000, rng)
    new = _random_rows(1000, rng, vocab_prefix="v")  # other words: never near-duplicates of old
    old_eval = set(_ids(split(old, 0.25, seed=1)[1]))
    grown_eval = set(_ids(split(new + old, 0.25, seed=1)[1]))
    assert {pid for pid in _ids(old) if pid in grown_eval} == old_eval


def _clustered_rows(rng, clusters=150):
    """Clusters of paraphrases: a base prompt and copies with one or two words changed."""
    rows = []
    for c in range(clusters):
        base = [f"c{c}w{i}" for i in range(rng.randint(12, 25))]
        rows.append(make_row(" ".join(base), "r", "benign"))
        for _ in range(rng.randint(0, 3)):
            words = list(base)
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
            rows.append(make_row(" ".join(words), "r", "benign"))
    return rows


@pytest.mark.parametrize("seed", range(5))
def test_near_duplicates_never_straddle_the_split(seed):
    rows = _clustered_rows(random.Random(seed))
    train, evals = split(rows, 0.2, seed=seed)
    grams = {r["prompt_id"]: word_ngrams(r["prompt"]) for r in rows}
    straddling = [(t["prompt"], e["prompt"]) for t, e in itertools.product(train, evals)
                  if jaccard(grams[t["prompt_id"]], grams[e["prompt_id"]]) >= 0.6]
    assert straddling == []
    # The guard did work: without it (threshold 1.0) fewer rows are in eval, and
    # every row it moved is a near-duplicate of some eval row (it moved no bystanders).
    raw_eval = split(rows, 0.2, seed=seed, threshold=1.0)[1]
    moved = set(_ids(evals)) - set(_ids(raw_eval))
    assert moved and set(_ids(raw_eval)) < set(_ids(evals))
    for pid in moved:
        assert any(jaccard(grams[pid], grams[e["prompt_id"]]) >= 0.6
                   for e in evals if e["prompt_id"] != pid)


def test_near_duplicate_chains_move_together():
    """a~b and b~c (Jaccard 14/22 = 0.64) but not a~c (10/26 = 0.38): if a is in eval,
    b and c must follow, or c would sit in train next to its paraphrase b."""
    words = [f"t{i}" for i in range(28)]
    a, b, c = (make_row(" ".join(words[k:k + 20]), "r", "benign") for k in (0, 4, 8))
    filler = _random_rows(40, random.Random(3))
    rows = [a, b, c, *filler]
    for seed in range(500):
        raw_eval = set(_ids(split(rows, 0.3, seed=seed, threshold=1.0)[1]))
        if a["prompt_id"] in raw_eval and not {b["prompt_id"], c["prompt_id"]} & raw_eval:
            break
    else:
        pytest.fail("no seed puts a alone in eval")
    evals = set(_ids(split(rows, 0.3, seed=seed)[1]))
    assert {a["prompt_id"], b["prompt_id"], c["prompt_id"]} <= evals
    assert evals - {a["prompt_id"], b["prompt_id"], c["prompt_id"]} == (
        raw_eval - {a["prompt_id"]})  # nothing else moved
