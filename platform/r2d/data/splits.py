"""The training and held-out prompt sets, computed one way for every stage.

Distillation reads :func:`training_prompts`, evaluation reads :func:`heldout_prompts`
(in distribution) and :func:`ood_prompts` (whole categories held out); all come from the
same load → mix → split, so a prompt held out for evaluation never
reaches a trace. The split is by ``prompt_id`` (see :func:`r2d.data.mix.split`) and is
taken *before* ``data.max_prompts`` caps the training side, so the cap never moves a
prompt across the line.
"""

from __future__ import annotations

import hashlib
import json
import logging

from r2d.data.dedup import NgramIndex
from r2d.data.mix import mix, split
from r2d.data.prompts import LoadReport
from r2d.data.sources import load_source

log = logging.getLogger(__name__)


def source_specs(cfg) -> list[dict]:
    """The configured sources as the dicts :func:`r2d.data.sources.load_source` takes."""
    specs = []
    for src in cfg.data.sources:
        spec = {"name": src.name}
        if src.path:
            spec["path"] = src.path
        if src.split:
            spec["split"] = src.split
        if src.limit:
            spec["limit"] = src.limit
        if src.label:
            spec["label"] = src.label
        specs.append(spec)
    return specs


def all_prompts(cfg, reports: list | None = None) -> list[dict]:
    """Every configured source loaded and mixed, duplicates removed (earliest source wins)."""
    loaded = []
    for spec in source_specs(cfg):
        report = LoadReport(source=str(spec["name"]))
        loaded.append(load_source(spec, report))
        if reports is not None:
            reports.append(report)
    # Keep all of every source: sizes are what remains unique after the earlier sources.
    seen: set[str] = set()
    sizes = []
    for rows in loaded:
        fresh = {r["prompt_id"] for r in rows} - seen
        sizes.append(len(fresh))
        seen |= fresh
    return mix(loaded, sizes=sizes, seed=cfg.data.seed)


def prompt_sets(cfg, reports: list | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, out-of-distribution) prompt rows; the train side capped at ``data.max_prompts``.

    Rows whose category is in ``data.heldout_categories`` never train: they form the
    out-of-distribution side, whole categories the model has not seen. The rest is split
    by ``prompt_id`` into train and the in-distribution held-out side. A held-out or
    out-of-distribution prompt that duplicates or nearly duplicates any training-side prompt
    (the contamination check's own measure and ``eval.contamination_threshold``) is left
    out, so that evaluation measures generalisation, not recall, and the check at
    evaluation time only ever fires on a real leak.

    Raises:
        ValueError: naming ``data.heldout_categories`` when a listed category matches no prompt.
    """
    threshold = cfg.eval.contamination_threshold
    rows = all_prompts(cfg, reports)
    held = set(cfg.data.heldout_categories)
    missing = sorted(held - {r["category"] for r in rows})
    if missing:
        known = sorted({r["category"] for r in rows if r["category"]})
        raise ValueError(f"data.heldout_categories: {missing} match no prompt of data.sources; categories: {known}")
    ood = [r for r in rows if r["category"] in held]
    train, heldout = split([r for r in rows if r["category"] not in held], cfg.data.eval_fraction,
                           seed=cfg.data.seed, threshold=threshold)
    heldout = without_near_duplicates(heldout, train, threshold)
    ood = without_near_duplicates(ood, train, threshold)
    if cfg.data.max_prompts:
        train = train[: cfg.data.max_prompts]
    return train, heldout, ood


def split_prompts(cfg, reports: list | None = None) -> tuple[list[dict], list[dict]]:
    """(train, in-distribution held-out) prompt rows (see :func:`prompt_sets`)."""
    train, heldout, _ = prompt_sets(cfg, reports)
    return train, heldout


def without_near_duplicates(heldout: list[dict], train: list[dict], threshold: float) -> list[dict]:
    """``heldout`` less the rows whose prompt duplicates or nearly duplicates a ``train`` prompt."""
    index = NgramIndex([r["prompt"] for r in train])
    leaked = {i for i, r in enumerate(heldout)
              if index.exact_match(r["prompt"]) is not None or index.best_match(r["prompt"], threshold)}
    if leaked:
        log.info("held-out side: %d of %d prompts left out as near duplicates of training prompts",
                 len(leaked), len(heldout))
    return [r for i, r in enumerate(heldout) if i not in leaked]


def training_prompts(cfg, reports: list | None = None) -> list[dict]:
    """The prompts distillation turns into traces."""
    return split_prompts(cfg, reports)[0]


def heldout_prompts(cfg, reports: list | None = None) -> list[dict]:
    """The in-distribution prompts evaluation may use: never distilled."""
    return prompt_sets(cfg, reports)[1]


def ood_prompts(cfg, reports: list | None = None) -> list[dict]:
    """The category-held-out prompts: whole categories never distilled nor trained on."""
    return prompt_sets(cfg, reports)[2]


def prompts_digest(rows: list[dict]) -> str:
    """A content hash of a prompt set (order-free), for lineage tags."""
    ids = sorted(r["prompt_id"] for r in rows)
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def select_balanced(rows: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` rows, alternating labels so each gets an equal share where it can.

    The safety experiments need as many benign prompts (look-alikes included) as harmful
    ones; a cap on a mix that is two-thirds harmful would keep that skew. Order within
    a label is kept (already shuffled by the mix seed).
    """
    if not limit or limit >= len(rows):
        return list(rows)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    queues = [list(reversed(v)) for _, v in sorted(by_label.items())]
    chosen: list[dict] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return chosen
