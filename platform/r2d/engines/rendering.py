"""What every engine shares: prompt rendering, the output columns, and text clean-up.

All engines render a prompt with :func:`r2d.pivots.render_conversation` (the model's own
chat template) and then tokenize the text the way vLLM's tokenize stage does
(``tokenizer(text)``, special tokens added by the tokenizer's own rule). That keeps
token ids identical across engines, which is what makes greedy outputs comparable.
"""

from __future__ import annotations

from typing import Any

from r2d.pivots import PIVOTS, THINK_CLOSE, THINK_OPEN, render_conversation

TEXT, NUM_TOKENS, ERROR = "generated_text", "num_generated_tokens", "gen_error"
OUTPUT_COLUMNS = (TEXT, NUM_TOKENS, ERROR)


def as_prompt(value: Any) -> str | list[dict]:
    """A prompt cell as a string or a list of chat messages.

    Raises:
        ValueError: when the cell is neither (counted as a row error by the engines).
    """
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return value
    if hasattr(value, "tolist"):  # Arrow/NumPy list cells
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        return [dict(m) for m in value]
    raise ValueError(f"prompt must be a string or a list of chat messages, got {type(value).__name__}")


def render_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> str:
    """Render a prompt for generation with the model's chat template.

    A template that writes the BOS token itself (Llama 3) would get a second one when the
    text is tokenized with special tokens, as vLLM's tokenize stage does; the leading BOS
    is therefore dropped from the text when the tokenizer adds it anyway.
    """
    text = render_conversation(tokenizer, prompt, None, system)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def stop_texts(tokenizer) -> tuple[str, ...]:
    """End-of-turn strings that may leak into decoded text and must be cut."""
    found = {tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "</s>", "<|endoftext|>"}
    return tuple(t for t in found if t)


def strip_stop(text: str, stops: tuple[str, ...]) -> str:
    """Cut the text at the first end-of-turn string (pivots are kept)."""
    for stop in stops:
        if stop in text:
            text = text.split(stop, 1)[0]
    return text


def exempt_token_ids(tokenizer) -> list[int]:
    """Token ids of the pivots and think tags, exempt from the repetition penalty.

    On a tokenizer with the pivot vocabulary these are single ids. On one without (a
    teacher that never saw pivots) they are the pieces the pivot text splits into: the
    penalty would otherwise make the teacher avoid writing its second ``[SAFE]``.
    """
    ids: set[int] = set()
    for token in (*PIVOTS, THINK_OPEN, THINK_CLOSE):
        ids.update(tokenizer(token, add_special_tokens=False).input_ids)
    return sorted(ids)


def sampling_dict(sampling) -> dict:
    """SamplingConfig as plain engine-neutral parameters."""
    return {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
            "max_tokens": int(sampling.max_tokens), "repetition_penalty": float(sampling.repetition_penalty),
            "seed": int(sampling.seed)}
