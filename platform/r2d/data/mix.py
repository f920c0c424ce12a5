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
from collections import deque
from collections.abc import Sequence

from r2d.data.dedup import THRESHOLD, NgramIndex


def seeded_rank(salt: str, pid: str) -> int:
    """A uniform 64-bit number fixed by (salt, prompt_id): every seeded choice over prompts sorts by it."""
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
        drawn = sorted(pool, key=lambda r: seeded_rank(salt, r["prompt_id"]))[:k]
        taken.update(r["prompt_id"] for r in drawn)
        chosen.extend(drawn)
    return sorted(chosen, key=lambda r: seeded_rank(f"order:{seed}", r["prompt_id"]))


def _near_duplicates(train: list[str], evals: list[str], threshold: float) -> set[int]:
    """Indices of train prompts within ``threshold`` of an eval prompt, closed transitively.

    A train prompt that moves to eval can itself pull in further train prompts, so the
    search runs to a fixed point; otherwise a chain a~b~c could straddle the split.
    """
    index = NgramIndex(train)
    moved: set[int] = set()
    queue = deque(evals)
    while queue:
        for match in index.matches(queue.popleft(), threshold, skip=moved, containment=False):
            moved.add(match.index)
            queue.append(train[match.index])
    return moved


def split(rows: Sequence[dict], eval_fraction: float, seed: int = 0,
          threshold: float = THRESHOLD) -> tuple[list[dict], list[dict]]:
    """Split rows into train and eval by prompt_id, keeping near-duplicates together.

    A row goes to eval when the hash of (seed, prompt_id) falls below
    ``eval_fraction``, so its side does not depend on the other rows. Then any
    train row whose word-3-gram Jaccard similarity with an eval row is at least
    ``threshold`` (:mod:`r2d.data.dedup`) moves to eval, so that paraphrases of an
    eval prompt cannot leak into training. Jaccard is symmetric, so the moved rows'
    own near duplicates follow them.

    Args:
        rows: Prompt rows with ``prompt_id`` and ``prompt``.
        eval_fraction: Target share of eval rows, in [0, 1]; the guard can only add to it.
        seed: Changes the assignment.
        threshold: Similarity at or above which two prompts are near-duplicates.

    Returns:
        ``(train, eval)``, each in input order.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    cut = eval_fraction * 2**64
    is_eval = [seeded_rank(f"split:{seed}", r["prompt_id"]) < cut for r in rows]
    train_idx = [i for i, e in enumerate(is_eval) if not e]
    moved = _near_duplicates([rows[i]["prompt"] for i in train_idx],
                             [r["prompt"] for r, e in zip(rows, is_eval) if e], threshold)
    for k in moved:
        is_eval[train_idx[k]] = True
    return ([r for r, e in zip(rows, is_eval) if not e],
            [r for r, e in zip(rows, is_eval) if e])
