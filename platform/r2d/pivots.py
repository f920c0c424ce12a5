"""The pivot vocabulary, and the one path between traces and text.

A trace is rendered into the assistant message by :func:`render_assistant`::

    <think>
    step one [SAFE]
    step two [RETHINK]
    </think>

    the answer [SAFE]

and the whole conversation by the model's own chat template in :func:`render_conversation`.
Training, serving, evaluation and distillation all use these two functions, and
:func:`parse_trace` is their inverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SAFE, UNSAFE, RETHINK = "[SAFE]", "[UNSAFE]", "[RETHINK]"
PIVOTS = (SAFE, UNSAFE, RETHINK)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
OPPOSITE = {SAFE: UNSAFE, UNSAFE: SAFE}
_PIVOT_RE = re.compile("|".join(re.escape(p) for p in PIVOTS))
_PAD_MULTIPLE = 64


class PivotVocabularyError(RuntimeError):
    """The tokenizer lacks a pivot token, or maps it to several tokens."""


@dataclass(frozen=True)
class PivotIds:
    safe: int
    unsafe: int
    rethink: int
    think_open: int
    think_close: int

    def by_token(self) -> dict[str, int]:
        return {SAFE: self.safe, UNSAFE: self.unsafe, RETHINK: self.rethink,
                THINK_OPEN: self.think_open, THINK_CLOSE: self.think_close}


@dataclass
class Trace:
    """A reasoning trace: steps each closed by a pivot, then an answer closed by a pivot."""

    steps: list[str]
    pivots: list[str]
    answer: str
    answer_pivot: str = SAFE

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.pivots):
            raise ValueError(f"{len(self.steps)} steps but {len(self.pivots)} pivots")
        bad = [p for p in [*self.pivots, self.answer_pivot] if p not in PIVOTS]
        if bad:
            raise ValueError(f"unknown pivot {bad[0]!r}, expected one of {PIVOTS}")


@dataclass
class ParsedTrace:
    """What :func:`parse_trace` recovered, and what was wrong with the text."""

    trace: Trace
    errors: list[str] = field(default_factory=list)
    closed: bool = True

    @property
    def ok(self) -> bool:
        return not self.errors


# ---------------------------------------------------------------- vocabulary

def add_pivot_tokens(tokenizer) -> list[str]:
    """Add the pivots, and ``<think>``/``</think>`` only where missing. Returns what was added.

    They are added as *normal* tokens: special tokens vanish from decoded text
    (``skip_special_tokens``), which would silently drop every pivot in vLLM's output.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (*PIVOTS, THINK_OPEN, THINK_CLOSE) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=False)
    return missing


def pivot_ids(tokenizer) -> PivotIds:
    """Look the pivot ids up by string, never by position in the vocabulary."""
    ids = {}
    for token in (*PIVOTS, THINK_OPEN, THINK_CLOSE):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
            raise PivotVocabularyError(f"{token!r} is not in the vocabulary; call add_pivot_tokens first")
        ids[token] = token_id
    return PivotIds(ids[SAFE], ids[UNSAFE], ids[RETHINK], ids[THINK_OPEN], ids[THINK_CLOSE])


def resize_for_pivots(model, tokenizer) -> int:
    """Grow the embeddings to hold the tokenizer, padded to a multiple of 64.

    New rows start at the mean of the existing rows, so a new token begins as an
    "average" token rather than noise that dominates the softmax. Returns the new size.
    """
    import torch

    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if old >= len(tokenizer):
        return old
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=_PAD_MULTIPLE, mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in _embedding_matrices(model)}.values():
            matrix[old:] = matrix[:old].mean(dim=0, keepdim=True)
    return model.get_input_embeddings().weight.shape[0]


def _embedding_matrices(model):
    yield model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None:
        yield head.weight


# ---------------------------------------------------------------- rendering

def render_assistant(trace: Trace) -> str:
    """Render a trace into the assistant message text (the one format everything uses)."""
    lines = [f"{step.strip()} {pivot}" for step, pivot in zip(trace.steps, trace.pivots)]
    reasoning = "\n".join(lines)
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{trace.answer.strip()} {trace.answer_pivot}"


def build_messages(prompt: str, trace: Trace | None = None, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if trace is not None:
        messages.append({"role": "assistant", "content": render_assistant(trace)})
    return messages


def render_conversation(tokenizer, prompt: str | list[dict], trace: Trace | None = None,
                        system: str | None = None) -> str:
    """Render a conversation with the model's chat template.

    With a trace, the assistant turn is included (training); without one, the text
    ends with the generation prompt (serving, evaluation, distillation).
    ``prompt`` may also be a list of chat messages (serving).
    """
    messages = list(prompt) if isinstance(prompt, list) else build_messages(prompt, trace, system)
    if isinstance(prompt, list) and system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=messages[-1]["role"] != "assistant")


def render_prefix_and_full(tokenizer, prompt: str, trace: Trace, system: str | None = None) -> tuple[str, str]:
    """The prompt part (ending in the generation prompt) and the full conversation.

    Training labels the tokens of ``full`` that follow ``prefix``: the assistant turn only.
    """
    prefix = render_conversation(tokenizer, prompt, None, system)
    full = render_conversation(tokenizer, prompt, trace, system)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    return prefix, full


# ---------------------------------------------------------------- parsing

def parse_trace(text: str, end_tokens: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "</s>")) -> ParsedTrace:
    """Split generated text back into steps, pivots and the answer.

    Tolerant: a missing ``</think>`` or a step without a pivot is recorded in
    ``errors`` instead of raising, so that callers can count and drop such rows.
    """
    for end in end_tokens:
        text = text.split(end, 1)[0]
    errors: list[str] = []
    body = text.strip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    elif THINK_OPEN in body:
        body = body.split(THINK_OPEN, 1)[1]
    elif THINK_CLOSE not in body:
        # A template may open <think> in the generation prompt (R1 does); only both missing is an error.
        errors.append("no <think>")
    closed = THINK_CLOSE in body
    if closed:
        reasoning, answer_text = body.split(THINK_CLOSE, 1)
    else:
        errors.append("no </think>")
        reasoning, answer_text = body, ""
    steps, pivots = _split_steps(reasoning, errors)
    answer, answer_pivot = _split_answer(answer_text, closed, errors)
    if not steps:
        errors.append("no reasoning steps")
    return ParsedTrace(Trace(steps, pivots, answer, answer_pivot), errors, closed)


def _split_steps(reasoning: str, errors: list[str]) -> tuple[list[str], list[str]]:
    steps, pivots = [], []
    position = 0
    for match in _PIVOT_RE.finditer(reasoning):
        step = reasoning[position:match.start()].strip()
        position = match.end()
        if not step:
            continue  # a doubled pivot closes no new step
        steps.append(step)
        pivots.append(match.group())
    tail = reasoning[position:].strip()
    if tail:
        errors.append("step without pivot")
        steps.append(tail)
        pivots.append(RETHINK)  # unknown verdict: the cautious pivot, never a silent SAFE
    return steps, pivots


def _split_answer(answer_text: str, closed: bool, errors: list[str]) -> tuple[str, str]:
    found = _PIVOT_RE.findall(answer_text)
    answer = _PIVOT_RE.sub("", answer_text).strip()
    answer = re.sub(r"[ \t]+\n", "\n", answer)
    if closed and not answer:
        errors.append("empty answer")
    if closed and not found:
        errors.append("answer without pivot")
    return answer, (found[-1] if found else RETHINK)


def decode_completion(tokenizer, ids) -> str:
    """Decode generated ids, dropping special tokens (eos, pad) but never pivots or think tags.

    Some tokenizers mark ``<think>`` as special; ``skip_special_tokens=True`` would erase it.
    """
    keep = set(pivot_ids(tokenizer).by_token().values())
    drop = set(tokenizer.all_special_ids) - keep
    kept = [int(i) for i in ids if int(i) not in drop]
    return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def strip_pivots(text: str) -> str:
    """Remove pivot tokens (and the spaces they leave) from text."""
    return re.sub(r"[ \t]*(?:" + _PIVOT_RE.pattern + r")", "", text).strip()


def split_reasoning(text: str) -> tuple[str, str]:
    """Return (reasoning, visible answer) with pivots and think tags removed.

    Text that opens ``<think>`` but never closes it is all reasoning: nothing is visible.
    The answer is :func:`answer_part` of what follows the first ``</think>``.
    """
    reasoning, answer = raw_parts(text)
    return strip_pivots(reasoning), strip_pivots(answer_part(answer))


_REOPENED = re.compile(r"[ \t]*" + re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE) + r"[ \t]*", re.DOTALL)


def answer_part(answer: str) -> str:
    """What a user reads of the text after the first ``</think>``; pivots are kept.

    A model may close its reasoning again after answering ("answer [SAFE] </think> more")
    or re-open it: reasoning re-opened there is dropped where it closes and cut off where
    it never does, and a stray ``</think>`` is removed, so no tag reaches the user.
    """
    if THINK_OPEN in answer:
        answer = _REOPENED.sub(_gap, answer)
        answer = answer.split(THINK_OPEN, 1)[0]
    return _CLOSE.sub(_gap, answer)


_CLOSE = re.compile(r"[ \t]*" + re.escape(THINK_CLOSE) + r"[ \t]*")


def _gap(match: re.Match) -> str:
    """What a removed tag leaves: a space between words, nothing at a line's start or end."""
    text, start, end = match.string, match.start(), match.end()
    at_edge = start == 0 or text[start - 1] == "\n" or end == len(text) or text[end] == "\n"
    return "" if at_edge else " "


def raw_parts(text: str) -> tuple[str, str]:
    """(reasoning, answer) with pivots kept; an unclosed ``<think>`` is all reasoning."""
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
    elif THINK_OPEN in text:
        reasoning, answer = text, ""
    else:
        reasoning, answer = "", text
    return reasoning.replace(THINK_OPEN, ""), answer


def count_pivots(text: str) -> dict[str, int]:
    """How often each pivot occurs in text."""
    found = _PIVOT_RE.findall(text)
    return {p: found.count(p) for p in PIVOTS}
