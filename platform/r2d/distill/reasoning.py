"""Reasoning written for a prompt when the teacher's cannot be used: analysis in the steps, the verdict in the pivots.

A trace whose every step ends "…, so I must not help." teaches nothing to CPO: the pivot
after such a sentence is already stated by it. So the steps here carry only the analysis —
what the user wants, what it acts on, the feature that decides the case — and the pivot
after each step is where the model must judge. Two sources, best first:

- **annotations** (``intent``, ``target``, ``deciding``: :data:`r2d.data.prompts.ANNOTATIONS`),
  written by the project with its own prompts: three steps per prompt;
- **the prompt itself**, for sources without annotations (HarmBench, StrongREJECT, user
  files): the request quoted and what carrying it out would mean for its category.

Refusals name what is refused ("I can't help you <intent>.") and vary by prompt, so the model
learns a refusal that fits the request, not one canned sentence; or, with ``distill.refusals:
generic``, never repeat the request's words, so that a refusal cannot start from the analysis
alone. Every template is one the keyword judge recognises (tested).
"""

from __future__ import annotations

import hashlib
import re

from r2d.pivots import SAFE, UNSAFE

ORIGINS = ("teacher", "annotation", "repaired")
"""Who wrote a trace's reasoning: the teacher; the project's annotations; the prompt-based fallback."""

# What carrying out a request of a harm category would mean, for the prompt-based fallback.
# HarmBench's semantic categories and StrongREJECT's categories, lower-cased.
CATEGORY_HARM = {
    "chemical_biological": "giving someone the means to poison or infect people",
    "illegal": "helping someone commit a crime",
    "misinformation_disinformation": "spreading falsehoods that mislead people",
    "harmful": "helping someone hurt people",
    "harassment_bullying": "helping someone harass or bully a person",
    "cybercrime_intrusion": "helping someone break into computers or accounts that are not theirs",
    "disinformation and deception": "deceiving people at scale",
    "hate, harassment and discrimination": "attacking people for who they are",
    "illegal goods and services": "supplying goods or services that are illegal",
    "non-violent crimes": "helping someone commit fraud, theft or another crime",
    "sexual content": "producing sexual content that exploits or harms people",
    "violence": "helping someone physically hurt people",
}
_DEFAULT_HARM = "helping someone harm other people"

_REFUSALS = (
    "I can't help you {intent}.",
    "I won't help you {intent}; I'm glad to help with something else.",
    "Sorry, but I can't help you {intent}.",
    "I can't assist with this: it would mean helping you {intent}.",
)
_GENERIC_REFUSALS = (
    "I can't help with that request.",
    "I won't help with this; I'm glad to help with something else.",
    "Sorry, but I can't help with that.",
    "I can't assist with this request.",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


def request_quote(prompt: str, max_words: int = 25) -> str:
    """The request in a few words: its last paragraph (a contextual prompt's question), first sentence, capped."""
    last = [p for p in prompt.strip().split("\n\n") if p.strip()][-1].strip()
    first = _SENTENCE_END.split(last, 1)[0]
    words = first.split()
    return " ".join(words[:max_words]) + (" ..." if len(words) > max_words else "")


def annotated(row: dict) -> bool:
    """Does the prompt row carry all three annotations?"""
    return all(str(row.get(k) or "").strip() for k in ("intent", "target", "deciding"))


ANALYSIS_ORDER = ("intent", "target", "deciding")
"""The annotation-written analysis steps, in their default order (``distill.analysis_order``)."""
REQUEST_STEP = "request"
"""An optional step name in ``analysis_order``: the request quoted, the step every unannotated trace opens with."""


def request_step(prompt: str) -> str:
    """The step that quotes the request: ``The user asks: "…"``."""
    return f'The user asks: "{request_quote(prompt)}"'


def request_of(row: dict) -> str:
    """The request a row asks: the plain request inside a jailbreak wrapper (``request``), else the prompt."""
    return str(row.get("request") or row["prompt"])


def annotation_steps(row: dict, order: tuple[str, ...] | list[str] = ANALYSIS_ORDER) -> list[str]:
    """The analysis steps from the annotations, in ``order``: the intent, the target, the deciding feature,
    and the quoted request where ``order`` names it (then both labels' traces can open alike)."""
    intent, target = row["intent"].strip().rstrip("."), row["target"].strip().rstrip(".")
    deciding = row["deciding"].strip()
    steps = {"intent": f"The user wants to {intent}.", "target": f"It acts on {target}.",
             "deciding": deciding if deciding.endswith((".", "!", "?")) else deciding + "."}
    if REQUEST_STEP in order:
        steps[REQUEST_STEP] = request_step(request_of(row))
    return [steps[name] for name in order]


def prompt_steps(row: dict) -> list[str]:
    """Two analysis steps from the prompt alone (no annotations): the request, and what it would mean."""
    request = request_step(request_of(row))
    if row["label"] == "harmful":
        harm = CATEGORY_HARM.get(str(row.get("category") or "").strip().lower(), _DEFAULT_HARM)
        return [request, f"Carrying it out would mean {harm}."]
    topic = str(row.get("category") or "").replace("lookalike-", "").replace("_", " ").strip() or "general"
    return [request, f"The topic is {topic}, and the answer would inform the user."]


def refusal(row: dict, style: str = "intent") -> str:
    """A refusal, varied by prompt: naming what is refused (the intent) where the row has one and ``style`` is
    ``intent``; with ``generic``, never the request's words (``distill.refusals``)."""
    intent = str(row.get("intent") or "").strip().rstrip(".")
    if intent and style == "intent":
        return _pick(_REFUSALS, row["prompt_id"]).format(intent=intent)
    return _pick(_GENERIC_REFUSALS, row["prompt_id"])


def written_reasoning(row: dict, order: tuple[str, ...] | list[str] = ANALYSIS_ORDER
                      ) -> tuple[str, list[str], list[str]]:
    """(origin, steps, pivots) for a row whose teacher reasoning is unusable.

    Every step of a harmful prompt's analysis is [UNSAFE] (each names the harm), every step
    of a benign prompt's [SAFE]; the sentences themselves never say which. ``order`` orders the
    annotation-written steps: the first pivot follows the first step, and a student that keeps
    its first verdict decides on what that step says.
    """
    origin, steps = (("annotation", annotation_steps(row, order)) if annotated(row)
                     else ("repaired", prompt_steps(row)))
    pivot = UNSAFE if row["label"] == "harmful" else SAFE
    return origin, steps, [pivot] * len(steps)
