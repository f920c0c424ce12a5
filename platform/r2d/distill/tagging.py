"""Step taggers (paper §3.3): decide the pivot that closes every reasoning step.

- ``rules`` (CPU default): the prompt's label, refusal detection and a harm lexicon.
- ``guard``: a Llama Guard 3 model, run through the shared engines, judges every step
  (see :func:`guard_tag`).

Both start from :func:`teacher_steps`, which turns whatever the teacher wrote into
steps: its own pivots where it wrote them, sentences where it did not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from r2d.llama_guard import llama_guard_messages, parse_llama_guard
from r2d.refusal import is_refusal
from r2d.pivots import PIVOTS, RETHINK, SAFE, THINK_CLOSE, THINK_OPEN, UNSAFE, parse_trace, strip_pivots

MAX_STEPS = 8
# Harm the lexicon recognises. Phrases are specific on purpose: "kill a process",
# "shoot a photo" and "execute a query" are benign look-alikes that must not match.
HARM_PATTERNS = (
    r"\bbombs?\b", r"\bexplosives?\b", r"\bdetonat\w*", r"\bpipe ?bomb", r"\bnerve agents?\b", r"\bsarin\b",
    r"\bricin\b", r"\banthrax\b", r"\bbioweapons?\b", r"\bchemical weapons?\b", r"\bweapons? of mass",
    r"\bmethamphetamine\b", r"\bcook(ing)? meth\b", r"\bfentanyl\b", r"\bheroin\b", r"\bcocaine\b",
    r"\bmalware\b", r"\bransomware\b", r"\bkeyloggers?\b", r"\bbotnets?\b", r"\bphishing\b",
    r"\bexploit(ing)? (a |the )?vulnerabilit", r"\bhack(ing)? into\b", r"\bsteal(ing)?\b", r"\bstolen\b",
    r"\blaunder(ing)?\b", r"\bcounterfeit\w*", r"\bfraud\w*", r"\bscam\w*", r"\bextort\w*", r"\bblackmail\w*",
    r"\bstalk(ing|er)?\b", r"\bdox\w*", r"\bharass\w*", r"\bkidnap\w*", r"\btraffick\w*",
    r"\bkill(ing)? (a |the |my |your )?(person|people|someone|somebody|him|her|them|wife|husband|neighbou?r|"
    r"child|children|boss|family)\b", r"\bmurder\w*", r"\bassassinat\w*", r"\bpoison(ing)? (someone|a person|"
    r"people|him|her|them|my)\b", r"\bhurt (someone|people|him|her|them)\b", r"\bself[- ]harm\b",
    r"\bsuicide\b", r"\bterroris\w*", r"\bmass shooting\b", r"\bshoot(ing)? (up )?(a |the )?(school|crowd|"
    r"people|someone)\b", r"\bgenocide\b", r"\bethnic cleansing\b", r"\bracial slurs?\b", r"\bhate speech\b",
    r"\bchild (sexual|porn\w*|abuse)\b", r"\bnon-?consensual\b", r"\bevade (the )?(police|taxes|detection)\b",
    r"\bwithout (getting )?caught\b", r"\buntraceable\b", r"\billegal(ly)?\b", r"\bweapons?\b",
)
_HARM_RE = re.compile("|".join(HARM_PATTERNS), re.IGNORECASE)
_CONCERN_RE = re.compile(r"\b(harmful|dangerous|unethical|unsafe|illegal|not appropriate|refuse|decline|"
                         r"cannot help|can't help|against (the law|policy))\b", re.IGNORECASE)
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'`(*-])|\n+")


@dataclass
class TeacherSteps:
    """Steps recovered from the teacher's text, with the pivots it wrote ("" where none)."""

    steps: list[str]
    teacher_pivots: list[str]
    answer: str
    closed: bool
    teacher_had_pivots: bool
    synthesised: bool = False
    errors: list[str] = field(default_factory=list)


def harm_terms(text: str) -> list[str]:
    """The harm-lexicon matches in ``text`` (lower-cased)."""
    return [m.group(0).lower() for m in _HARM_RE.finditer(text or "")]


def split_sentences(text: str, max_steps: int = MAX_STEPS) -> list[str]:
    """Split free reasoning into at most ``max_steps`` steps (sentences, the tail merged)."""
    parts = [p.strip() for p in _SENTENCE_RE.split(strip_pivots(text)) if p and p.strip()]
    parts = [p for p in parts if re.search(r"\w", p)]
    if len(parts) > max_steps:
        parts = parts[: max_steps - 1] + [" ".join(parts[max_steps - 1:])]
    return parts


def teacher_steps(text: str, label: str) -> TeacherSteps:
    """Recover reasoning steps and the answer from raw teacher output, whatever its shape.

    - ``<think>…</think> answer``: the teacher's own steps where it wrote pivots,
      sentences where it did not.
    - ``<think>`` never closed: all reasoning, no answer.
    - no ``<think>``: all answer, no steps (``synthesised``: the reasoning is written
      later, from the prompt's annotations; :mod:`r2d.distill.reasoning`).
    """
    parsed = parse_trace(text)
    has_think = THINK_OPEN in text
    reasoning = ""
    if has_think:
        body = text.split(THINK_OPEN, 1)[1]
        reasoning = body.split(THINK_CLOSE, 1)[0] if THINK_CLOSE in body else body
        answer = parsed.trace.answer if parsed.closed else ""
    else:
        answer = strip_pivots(text.replace(THINK_CLOSE, ""))
    wrote_pivots = any(p in reasoning for p in PIVOTS)
    if wrote_pivots:
        steps = list(parsed.trace.steps)
        # parse_trace gives a tail without a pivot the cautious [RETHINK]: that one is ours, not the teacher's.
        mine = "step without pivot" in parsed.errors
        pivots = [p if not (mine and i == len(steps) - 1) else "" for i, p in enumerate(parsed.trace.pivots)]
    else:
        steps = split_sentences(reasoning)
        pivots = [""] * len(steps)
    synthesised = not steps
    return TeacherSteps(steps, pivots, answer.strip(), parsed.closed, wrote_pivots, synthesised,
                        list(parsed.errors))


def rules_step_pivot(step: str, label: str, prompt: str = "") -> str:
    """The rules tagger's pivot for one step.

    Harmful prompt: harm in the step → [UNSAFE]; a step that voices the concern or
    refuses → [SAFE] (it is turning away); anything else → [RETHINK] (it may be heading
    towards the harm).

    Benign prompt: [SAFE], except a step with harm the prompt itself never mentioned
    → [RETHINK] (the reasoning drifted). Harm words the prompt does use are in scope:
    "bath bombs" or "how was Lincoln assassinated" are look-alikes, and tagging their
    steps unsafe would teach exactly the over-refusal the platform measures.
    """
    found = harm_terms(step)
    if label != "harmful":
        in_scope = set(harm_terms(prompt))
        return RETHINK if any(term not in in_scope for term in found) else SAFE
    if found:
        return UNSAFE
    if _CONCERN_RE.search(step) or is_refusal(step):
        return SAFE
    return RETHINK


def rules_tag(steps: list[str], label: str, prompt: str = "") -> tuple[list[str], str]:
    """Pivots for every step and for the answer, by the rules.

    A harmful prompt's trace always carries at least one [UNSAFE]: when the lexicon finds
    no harm in any step, the first step that is not already turning away (else the
    first step) is where the trace must recognise it. Its answer pivot is [UNSAFE]
    (the request is unsafe, the answer refuses it); a benign prompt's is [SAFE].
    """
    pivots = [rules_step_pivot(s, label, prompt) for s in steps]
    if label == "harmful" and UNSAFE not in pivots and pivots:
        first = next((i for i, p in enumerate(pivots) if p == RETHINK), 0)
        pivots[first] = UNSAFE
    return pivots, (UNSAFE if label == "harmful" else SAFE)


# ---------------------------------------------------------------- guard tagger

def guard_rows(row: dict) -> list[dict]:
    """One guard request per step (flat_map): the conversation so far ends with that step."""
    out = []
    for i, step in enumerate(row["reasoning_steps"]):
        messages = llama_guard_messages(row["prompt"], step, visible_only=False)
        out.append({"prompt_id": row["prompt_id"], "step_index": i, "guard_messages": messages})
    return out


def guard_pivot(guard_output: str, gen_error: str = "") -> str:
    """Llama Guard's verdict on a step as a pivot; unparsable or failed → [RETHINK]."""
    if gen_error:
        return RETHINK
    verdict = parse_llama_guard(guard_output)
    if verdict.get("unsafe") is None:
        return RETHINK
    return UNSAFE if verdict["unsafe"] else SAFE


def merge_guard_verdicts(rows: list[dict], verdicts: list[dict]) -> list[dict]:
    """Write each guarded step's pivot back onto its trace row (rows keep their other fields)."""
    by_id: dict[str, dict[int, str]] = {}
    for v in verdicts:
        by_id.setdefault(v["prompt_id"], {})[int(v["step_index"])] = guard_pivot(
            v.get("generated_text", ""), v.get("gen_error", ""))
    for row in rows:
        found = by_id.get(row["prompt_id"], {})
        row["step_pivots"] = [found.get(i, RETHINK) for i in range(len(row["reasoning_steps"]))]
    return rows


def guard_tag(rows: list[dict], guard_model, guard_engine, sampling) -> list[dict]:
    """Re-tag every step of ``rows`` with a Llama Guard 3 model through the shared engines."""
    import ray

    from r2d.engines import generate

    requests = [r for row in rows for r in guard_rows(row)]
    if not requests:
        return rows
    ds = generate(ray.data.from_items(requests), guard_model, guard_engine, sampling,
                  system_prompt=None, prompt_column="guard_messages")
    verdicts = ds.select_columns(["prompt_id", "step_index", "generated_text", "gen_error"]).take_all()
    return merge_guard_verdicts(rows, verdicts)
