"""Prompt identity and the row schema that every prompt source produces.

A prompt row is a plain dict, the same for every source::

    {"prompt_id": "3f1c...",        # prompt_id(prompt): 16 hex chars
     "prompt": "How do I ...?",
     "source": "harmbench:test",    # where it came from: name[:detail]
     "label": "harmful",            # harmful | benign
     "category": "cybercrime_intrusion",
     "lookalike": False,            # benign but sounds scary
     "reference": "",               # a helpful answer, where the source has one
     "attack": "none"}              # jailbreak template applied, "none" if plain

The layer is split in three modules so each stays small:

- this one: identity (:func:`prompt_id`), the row constructor and the error and
  report types;
- :mod:`r2d.data.sources`: one loader per source and :func:`load_source`, the
  dispatch from a config dict;
- :mod:`r2d.data.mix`: :func:`mix` and :func:`split`;
- :mod:`r2d.data.dedup`: the normal forms and the near-duplicate index.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from r2d.data.dedup import canonical

LABELS = ("harmful", "benign")
NO_ATTACK = "none"
ROW_KEYS = ("prompt_id", "prompt", "source", "label", "category", "lookalike",
            "reference", "attack", "intent", "target", "deciding")
ANNOTATIONS = ("intent", "target", "deciding")
"""Per-prompt annotations the project authors with its own prompts: what the user wants, what it
acts on, and the feature that decides the case. Distillation writes reasoning from them when the
teacher's is unusable, and checks a teacher's verdict against the label they support."""

log = logging.getLogger(__name__)


class PromptSourceError(ValueError):
    """A prompt source cannot be read at all (missing file, column, package or network)."""


@dataclass
class LoadReport:
    """What a loader read, kept and skipped; filled in by the loader it is passed to.

    Malformed rows (an empty prompt, an unknown label) are skipped and counted
    here instead of stopping the load: one bad line in a 50k-row file should
    cost one row, and the manifest should say so.
    """

    source: str = ""
    """The source the counts belong to, e.g. ``file:prompts.csv``."""
    read: int = 0
    """Rows (or lines) looked at."""
    kept: int = 0
    """Rows returned."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped rows by reason, e.g. ``{"empty_prompt": 2, "bad_label": 1}``."""

    def skip(self, reason: str) -> None:
        """Count one skipped row under ``reason``."""
        self.skipped[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, for manifests and MLflow."""
        return {"source": self.source, "read": self.read, "kept": self.kept,
                "skipped": dict(sorted(self.skipped.items()))}

    def warn_if_skipped(self) -> None:
        """Log the skip counts, so that a caller who passed no report still hears of them."""
        if self.skipped:
            log.warning("%s: skipped %d of %d rows: %s", self.source or "prompts",
                        sum(self.skipped.values()), self.read, dict(self.skipped))


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of sha256 of its normalised form.

    Args:
        text: The prompt.

    Returns:
        16 lower-case hex characters; equal for prompts that differ only in case,
        whitespace or Unicode compatibility forms.
    """
    return hashlib.sha256(canonical(text).encode("utf-8")).hexdigest()[:16]


def make_row(prompt: str, source: str, label: str, category: str = "",
             lookalike: bool = False, reference: str = "",
             attack: str = NO_ATTACK, intent: str = "", target: str = "", deciding: str = "") -> dict[str, Any]:
    """Build one prompt row in the shared schema.

    Args:
        prompt: The prompt text; surrounding whitespace is stripped.
        source: Where it came from, ``name`` or ``name:detail``.
        label: ``"harmful"`` or ``"benign"``.
        category: Free-form topic or harm category.
        lookalike: True for a benign prompt that uses alarming words.
        reference: A helpful answer, or ``""``.
        attack: Name of the jailbreak template applied, ``"none"`` for a plain prompt.
        intent, target, deciding: The prompt's annotations (see :data:`ANNOTATIONS`), or ``""``.

    Returns:
        A dict with exactly the keys of :data:`ROW_KEYS`.

    Raises:
        ValueError: If the prompt is empty or the label unknown.
    """
    prompt = prompt.strip()
    if not prompt:
        raise ValueError("empty prompt")
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    return {"prompt_id": prompt_id(prompt), "prompt": prompt, "source": source,
            "label": label, "category": category, "lookalike": bool(lookalike),
            "reference": reference, "attack": attack or NO_ATTACK,
            "intent": intent.strip(), "target": target.strip(), "deciding": deciding.strip()}
