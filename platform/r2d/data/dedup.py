"""Duplicate and near-duplicate prompts: one normaliser, one n-gram index, one measure.

The split (a held-out prompt's paraphrase must not train) and the contamination check
(an evaluation prompt must not be a training prompt) ask the same question, so they
share everything here:

- :func:`canonical`: the identity form (NFKC, lower case, whitespace collapsed) that
  ``prompt_id`` hashes. Conservative on purpose: punctuation can change a request.
- :func:`normalise`: the comparison form, :func:`canonical` with apostrophes dropped
  ("don't" → "dont") and other punctuation turned into spaces.
- :func:`ngrams`: word 3-grams of the comparison form.
- :class:`NgramIndex`: an inverted index over many prompts' n-grams that finds, for a
  query, the most similar indexed prompt at or above a threshold.

Similarity is Jaccard |Q∩T|/|Q∪T|, or containment |Q∩T|/|Q| when the query has at
least three n-grams (one changed word removes up to three of a short prompt's few
trigrams, and a query embedded in a longer prompt is a copy too).

On short prompts n-grams alone confuse a look-alike with a leak: "How do I kill someone?"
shares two of its three trigrams with "How do I kill a process", yet the word that
decides the case differs. So a near duplicate must also carry the query's distinguishing
words: at most a quarter of the query's content words (:func:`content_words`, stop words
removed) may be missing from the match; a query of three content words or fewer must have
exactly the match's ("buy a gun" is not "buy a glue gun"), while a longer one may sit inside
a longer prompt (a jailbreak wrapper around a copied request is still a copy).
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

NGRAM = 3
THRESHOLD = 0.6
"""Similarity at or above which two prompts are near duplicates (``eval.contamination_threshold``)."""
_MIN_NGRAMS_FOR_CONTAINMENT = 3
_MISSING_CONTENT_SHARE = 0.25
_SHORT_WORDS = 3
_APOSTROPHES = ("'", "\u2019", "\u2018", "\u02bc")
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just let lets me more most my myself no nor not now of
off on once only or other our ours ourselves out over own please same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves im ive id dont cant
whats hows tell give show write explain describe list make get way ways one me
""".split())
"""Words that carry no distinction between two requests (function words and request verbs)."""


def canonical(text: str) -> str:
    """Identity form of a prompt: NFKC, lower case, whitespace collapsed.

    NFKC folds look-alike code points (full-width letters, ligatures, non-breaking
    spaces) so that trivially re-encoded copies of a prompt share one id.
    """
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def normalise(text: str) -> str:
    """Comparison form: :func:`canonical`, case-folded, apostrophes removed, punctuation as spaces."""
    text = canonical(text).casefold()
    for apostrophe in _APOSTROPHES:
        text = text.replace(apostrophe, "")
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    """Word n-grams of the comparison form, each joined by spaces.

    A text shorter than ``n`` words is one shorter gram (so it still matches its exact
    copy); an empty text has none. Grams are strings: they hash faster than tuples.
    """
    words = normalise(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def content_words(text: str) -> frozenset[str]:
    """The words of the comparison form that can distinguish two requests (stop words removed)."""
    return frozenset(w for w in normalise(text).split() if w not in STOP_WORDS)


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b|, and 0 when both are empty."""
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass(frozen=True)
class Match:
    """The most similar indexed prompt for a query."""

    index: int
    jaccard: float
    containment: float


class NgramIndex:
    """Inverted n-gram index over prompts, for near-duplicate search.

    A query Q can reach similarity t with T only if |Q∩T| ≥ ceil(t·|Q|), so T must
    share one of Q's |Q| − ceil(t·|Q|) + 1 rarest grams: only those postings are read,
    which keeps common phrases ("how do i") from making the search quadratic.
    """

    def __init__(self, texts: Sequence[str] = ()) -> None:
        self.exact: dict[str, int] = {}
        self.sets: list[frozenset[str]] = []
        self.words: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)
        for text in texts:
            self.add(text)

    def add(self, text: str) -> int:
        """Index one more prompt; returns its index."""
        i = len(self.sets)
        self.exact.setdefault(normalise(text), i)
        grams = ngrams(text)
        self.sets.append(grams)
        self.words.append(content_words(text))
        for gram in grams:
            self.postings[gram].append(i)
        return i

    def exact_match(self, text: str) -> int | None:
        """Index of the first indexed prompt equal to ``text`` in comparison form."""
        return self.exact.get(normalise(text))

    def matches(self, text: str, threshold: float = THRESHOLD, skip: set[int] | None = None,
                containment: bool = True) -> list[Match]:
        """Every indexed prompt at or above ``threshold`` of ``text``, in index order.

        Args:
            text: The query prompt.
            threshold: Similarity in (0, 1].
            skip: Indexed prompts to ignore.
            containment: Count containment too (asymmetric: the query in the indexed
                prompt); False means Jaccard only, a symmetric relation.
        """
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        grams = ngrams(text)
        if not grams:
            return []
        # Jaccard >= t implies containment >= t, so the containment bound filters for both.
        # The epsilon keeps float error in t*|Q| from shortening the prefix.
        need = max(1, math.ceil(threshold * len(grams) - 1e-9))
        prefix = sorted(grams, key=lambda g: (len(self.postings.get(g, ())), g))[: len(grams) - need + 1]
        candidates = sorted({j for gram in prefix for j in self.postings.get(gram, ())} - (skip or set()))
        words = content_words(text)
        allowed_missing = int(_MISSING_CONTENT_SHARE * len(words))
        found = []
        for j in candidates:
            shared = len(grams & self.sets[j])
            jac, cont = shared / len(grams | self.sets[j]), shared / len(grams)
            near = jac >= threshold or (containment and cont >= threshold and len(grams) >= _MIN_NGRAMS_FOR_CONTAINMENT)
            same_words = words == self.words[j] if len(words) <= _SHORT_WORDS else \
                len(words - self.words[j]) <= allowed_missing
            if near and same_words:
                found.append(Match(j, round(jac, 4), round(cont, 4)))
        return found

    def best_match(self, text: str, threshold: float = THRESHOLD) -> Match | None:
        """The most similar indexed prompt at or above ``threshold`` (Jaccard, then containment), or None."""
        found = self.matches(text, threshold)
        return max(found, key=lambda m: (m.jaccard, m.containment, -m.index)) if found else None
