"""The generation graph for evaluation: prompt rows in, the same rows with the model's answers out.

    ray.data.from_items(rows, sorted by prompt length)   one block per engine batch
    -> r2d.engines.generate(model, engine, sampling)     + generated_text, num_generated_tokens, gen_error
    -> take_all, back in row order

Evaluation generates the evaluated model's answers and the judge models' verdicts through it,
so the engine that answers here is the one distillation and serving use.
"""

from __future__ import annotations

import math
import time
from typing import Any

from r2d.config import EngineConfig, ModelConfig, SamplingConfig
from r2d.engines.generate import generate


def generate_rows(rows: list[dict[str, Any]], model: ModelConfig, engine: EngineConfig, sampling: SamplingConfig,
                  system_prompt: str | None = None, prompt_column: str = "prompt") -> tuple[list[dict], float]:
    """Run ``rows`` through the engines on a Ray Dataset; returns (rows with outputs, wall seconds)."""
    import ray

    if not rows:
        return [], 0.0
    start = time.perf_counter()
    # Similar lengths batch together: a jailbreak template next to a one-line prompt pads the batch.
    # One block per batch (at least one per actor): from_items makes a single block of a small list,
    # and a single block feeds a single actor however many the engine has.
    blocks = max(engine.concurrency, math.ceil(len(rows) / engine.batch_size))
    ds = ray.data.from_items(sorted(rows, key=lambda r: len(str(r[prompt_column]))),
                             override_num_blocks=min(len(rows), blocks))
    out = generate(ds, model, engine, sampling, system_prompt=system_prompt, prompt_column=prompt_column)
    result = sorted(out.take_all(), key=lambda r: r["row"])
    return result, time.perf_counter() - start
