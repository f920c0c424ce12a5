"""Mixing prompt sources and splitting them into train and eval, deterministically.

Both functions decide by hashing ``seed`` with each row's ``prompt_id``, never
by position or by a shared random stream. So a prompt's fate does not depend on
the order of the input or on what else is in it: adding rows to a source adds
rows to the mix without reshuffling the rest, and a prompt never changes side
of the split when the set grows (unless it becomes a near-duplicate of an eval
prompt, which is the point of the guard below).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, deque
from collections.abc import Sequence

from r2d.data.prompts import LoadReport, normalise_prompt

NEAR_DUP_THRESHOLD = 0.6
NGRAM = 3
_WORD = re.compile(r"\w+")


def _rank(salt: str, pid: str) -> int:
    """A uniform 64-bit number fixed by (salt, prompt_id)."""
    return int(hashlib.sha256(f"{salt}:{pid}".encode()).hexdigest()[:16], 16)


def _unique(rows: Sequence[dict], exclude: set[str]) -> list[dict]:
    """Rows whose prompt_id is not in ``exclude``, first occurrence of each id kept."""
    seen, out = set(exclude), []
    for row in rows:
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            out.append(row)
    return out


def _sizes_from_ratios(ratios: Sequence[float], available: Sequence[int],
                       total: int | None) -> list[int]:
    """Split ``total`` by ``ratios`` (largest remainder, so the parts sum to ``total``).

    With no total, take the largest total that every source can supply at these ratios.
    """
    if any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be non-negative with a positive sum, got {list(ratios)}")
    shares = [r / sum(ratios) for r in ratios]
    if total is None:
        total = math.floor(min(n / s for n, s in zip(available, shares) if s > 0) + 1e-9)
    raw = [total * s for s in shares]
    sizes = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (sizes[i] - raw[i], i))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def mix(sources: Sequence[Sequence[dict]], sizes: Sequence[int] | None = None,
        ratios: Sequence[float] | None = None, total: int | None = None,
        seed: int = 0) -> list[dict]:
    """Draw a deterministic, de-duplicated mixture of several prompt sources.

    Exact duplicates (same ``prompt_id``) appear once; a prompt present in
    several sources counts for the earliest source that draws it. Within a
    source, the rows drawn are those with the smallest hash of (seed, prompt_id).

    Args:
        sources: One list of rows per source.
        sizes: Rows to draw from each source. Exclusive with ``ratios``.
        ratios: Relative weights per source (any positive scale), used with ``total``.
        total: Rows in the mixture when ``ratios`` is given; ``None`` takes as
            many as the smallest source allows at those ratios.
        seed: Changes which rows are drawn and the output order.

    Returns:
        The drawn rows, in an order shuffled by ``seed``.

    Raises:
        ValueError: For both or neither of sizes/ratios, a length mismatch, or a
            source with fewer unique rows than asked.
    """
    if (sizes is None) == (ratios is None):
        raise ValueError("give exactly one of sizes or ratios")
    weights = sizes if sizes is not None else ratios
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} sizes/ratios for {len(sources)} sources")
    if ratios is not None:
        # Availability after removing every earlier source's ids: a lower bound,
        # so the sizes computed from it can always be drawn.
        seen: set[str] = set()
        available = []
        for rows in sources:
            pool = _unique(rows, seen)
            available.append(len(pool))
            seen.update(r["prompt_id"] for r in pool)
        sizes = _sizes_from_ratios(ratios, available, total)
    salt, chosen, taken = f"mix:{seed}", [], set()
    for i, (rows, k) in enumerate(zip(sources, sizes)):
        pool = _unique(rows, taken)
        if k < 0 or k > len(pool):
            raise ValueError(f"source {i}: asked for {k} rows, {len(pool)} unique available")
        drawn = sorted(pool, key=lambda r: _rank(salt, r["prompt_id"]))[:k]
        taken.update(r["prompt_id"] for r in drawn)
        chosen.extend(drawn)
    return sorted(chosen, key=lambda r: _rank(f"order:{seed}", r["prompt_id"]))


def mix_sources(specs: Sequence[dict], total: int | None = None, seed: int = 0,
                reports: list[LoadReport] | None = None) -> list[dict]:
    """Load each source spec and mix them at the specs' ``weight`` (default 1).

    Args:
        specs: Source config dicts, as for :func:`r2d.data.sources.load_source`.
        total: Rows in the mixture; ``None`` for as many as the weights allow.
        seed: As for :func:`mix`.
        reports: If given, one :class:`LoadReport` per spec is appended to it.
    """
    from r2d.data.sources import load_source  # sources imports this package's prompts only

    loaded = []
    for spec in specs:
        report = LoadReport(source=str(spec.get("name")))
        loaded.append(load_source(spec, report))
        if reports is not None:
            reports.append(report)
    weights = [float(s.get("weight", 1.0)) for s in specs]
    return mix(loaded, ratios=weights, total=total, seed=seed)


def word_ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    """Word n-grams of the normalised text, each joined by spaces.

    A text shorter than n words is one gram, so that short prompts still match
    their exact copies. Grams are strings, not tuples, because they hash and
    compare faster, and ``\\w+`` words never contain a space.
    """
    words = _WORD.findall(normalise_prompt(text))
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b|, and 0 when both are empty."""
    if not a and not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _prefix(grams: list, threshold: float) -> list:
    """The prefix-filter prefix: any set with Jaccard >= threshold shares a gram in it.

    Sets are sorted by one global order (rarest gram first); if J(x, y) >= t then
    |x ∩ y| >= t·max(|x|, |y|), so the first |x| - ceil(t·|x|) + 1 grams of x and
    the first of y must meet (Bayardo et al., 2007). Rare grams first keeps the
    posting lists that are probed short.
    """
    keep = len(grams) - math.ceil(threshold * len(grams) - 1e-9) + 1
    return grams[:keep]


def _near_duplicates(train: list[frozenset], evals: list[frozenset],
                     threshold: float) -> set[int]:
    """Indices of train sets within ``threshold`` of an eval set, closed transitively.

    A train set that moves to eval can itself pull in further train sets, so the
    search runs to a fixed point; otherwise a chain a~b~c could straddle the split.
    """
    df = Counter(g for s in (*train, *evals) for g in s)
    order = lambda s: sorted(s, key=lambda g: (df[g], g))  # noqa: E731
    train_sorted = [order(s) for s in train]
    index: dict[str, list[int]] = {}
    for i, grams in enumerate(train_sorted):
        for g in _prefix(grams, threshold):
            index.setdefault(g, []).append(i)
    moved: set[int] = set()
    queue = deque((s, order(s)) for s in evals)
    while queue:
        query, query_sorted = queue.popleft()
        probed: set[int] = set()
        for g in _prefix(query_sorted, threshold):
            for i in index.get(g, ()):
                if i in moved or i in probed:
                    continue
                probed.add(i)
                if jaccard(train[i], query) >= threshold:
                    moved.add(i)
                    queue.append((train[i], train_sorted[i]))
    return moved


def split(rows: Sequence[dict], eval_fraction: float, seed: int = 0,
          threshold: float = NEAR_DUP_THRESHOLD) -> tuple[list[dict], list[dict]]:
    """Split rows into train and eval by prompt_id, keeping near-duplicates together.

    A row goes to eval when the hash of (seed, prompt_id) falls below
    ``eval_fraction``, so its side does not depend on the other rows. Then any
    train row whose word-3-gram Jaccard similarity with an eval row is at least
    ``threshold`` moves to eval, so that paraphrases of an eval prompt cannot
    leak into training. Candidates come from an inverted index with prefix
    filtering, so the cost grows with the number of similar pairs, not with
    train × eval.

    Args:
        rows: Prompt rows with ``prompt_id`` and ``prompt``.
        eval_fraction: Target share of eval rows, in [0, 1]; the guard can only add to it.
        seed: Changes the assignment.
        threshold: Jaccard similarity at or above which two prompts are near-duplicates.

    Returns:
        ``(train, eval)``, each in input order.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    cut = eval_fraction * 2**64
    is_eval = [_rank(f"split:{seed}", r["prompt_id"]) < cut for r in rows]
    train_idx = [i for i, e in enumerate(is_eval) if not e]
    grams = [word_ngrams(r["prompt"]) for r in rows]
    moved = _near_duplicates([grams[i] for i in train_idx],
                             [grams[i] for i, e in enumerate(is_eval) if e], threshold)
    for k in moved:
        is_eval[train_idx[k]] = True
    return ([r for r, e in zip(rows, is_eval) if not e],
            [r for r, e in zip(rows, is_eval) if e])
