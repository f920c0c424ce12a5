"""One interface for every engine: a Ray dataset of prompts in, the same rows with generations out."""

from __future__ import annotations

from r2d.engines.openai_engine import OpenAIGenerator, generate_openai
from r2d.engines.transformers_engine import TransformersGenerator, generate_transformers
from r2d.engines.vllm_engine import VLLMGenerator, generate_vllm

ENGINES = {"transformers": generate_transformers, "vllm": generate_vllm, "openai": generate_openai}

# The same engines as callables held in one process (an actor that outlives a dataset).
GENERATORS = {
    "transformers": lambda model, engine, sampling, column: TransformersGenerator(model, engine, sampling, None,
                                                                                  column),
    "vllm": lambda model, engine, sampling, column: VLLMGenerator(model, engine, sampling, None, column),
    "openai": lambda model, engine, sampling, column: OpenAIGenerator(engine, sampling, None, column, model.source),
}


def in_process_generator(model, engine, sampling, prompt_column: str = "prompt"):
    """The engine the config names, loaded in this process: a callable ``batch -> batch`` with the output columns.

    What :func:`generate` does to a dataset, this does to one batch (a dict of arrays) at a time.
    """
    if engine.kind not in GENERATORS:
        raise ValueError(f"engine.kind: got {engine.kind!r}, expected one of {sorted(GENERATORS)}")
    return GENERATORS[engine.kind](model, engine, sampling, prompt_column)


def generate(ds, model, engine, sampling, system_prompt: str | None = None, prompt_column: str = "prompt"):
    """Generate an answer for every row of ``ds`` with the engine the config names.

    Args:
        ds: a ``ray.data.Dataset`` whose ``prompt_column`` holds a prompt string (or a list
            of chat messages).
        model: :class:`r2d.config.ModelConfig` of the generating model (for ``openai``,
            ``engine.api_model`` names the served model; the source is the fallback).
        engine: :class:`r2d.config.EngineConfig`: kind, batch size, actors, resources.
        sampling: :class:`r2d.config.SamplingConfig`.
        system_prompt: system message added to every conversation.
        prompt_column: column holding the prompts.

    Returns:
        A lazy dataset with every input column plus ``generated_text`` (str),
        ``num_generated_tokens`` (int) and ``gen_error`` (str, ``""`` when ok).
    """
    if engine.kind not in ENGINES:
        raise ValueError(f"engine.kind: got {engine.kind!r}, expected one of {sorted(ENGINES)}")
    return ENGINES[engine.kind](ds, model, engine, sampling, system_prompt, prompt_column)
