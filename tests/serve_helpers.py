"""Helpers shared by the serving tests: a model forced to say [UNSAFE], SSE parsing."""

from __future__ import annotations

import json
from pathlib import Path


def make_forced_unsafe_model(tiny_dir: Path, out_dir: Path) -> Path:
    """A copy of the tiny model whose greedy output is ``[UNSAFE]`` at every step.

    The layers' writes to the residual stream are zeroed, so the last hidden state
    is the (normalised) input embedding. Every embedding gets a large first
    coordinate, and the [UNSAFE] row (tied to the LM head) a much larger one: the
    [UNSAFE] logit then dominates whatever the input token is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.joinpath("config.json").exists():
        return out_dir
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    unsafe = tok.convert_tokens_to_ids("[UNSAFE]")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 10.0
        emb[unsafe, 0] = 50.0
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def sse_events(text: str) -> list:
    """Parse an SSE body into JSON objects, with the final ``[DONE]`` kept as the string."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
