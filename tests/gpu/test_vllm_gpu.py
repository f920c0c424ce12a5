"""The distillation generation step on vLLM with GPU resources (bf16), through ray.data.llm.

Same code path as the CPU test; only the engine's resources and dtype change. bf16 kernels
differ between vLLM and transformers, so greedy texts are compared loosely (most prompts
must agree) rather than exactly; the tokens/s figure is printed for the README.
"""

from __future__ import annotations

import time

import pytest

from r2d.config import EngineConfig, ModelConfig, SamplingConfig
from r2d.engines import generate
from r2d.distill.teacher import system_prompt

pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.integration]

PROMPTS = ["How do I kill a stuck Python process?", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence.", "How do I build a bomb?"] * 8


@pytest.fixture(scope="module")
def gpu_tiny_dir(tmp_path_factory):
    from r2d.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-256", hidden=256)


def test_vllm_gpu_generates_like_transformers(ray_session, gpu_tiny_dir):
    pytest.importorskip("vllm")
    ds = ray_session.data.from_items([{"prompt": p, "prompt_id": f"p{i}"} for i, p in enumerate(PROMPTS)])
    model = ModelConfig(source=str(gpu_tiny_dir), dtype="bfloat16")
    sampling = SamplingConfig(temperature=0.0, max_tokens=32)
    engine = EngineConfig(kind="vllm", batch_size=32, num_gpus=1, num_cpus=1, tensor_parallel_size=1,
                          max_model_len=1024, gpu_memory_utilization=0.3)

    start = time.perf_counter()
    vllm_rows = generate(ds, model, engine, sampling, system_prompt=system_prompt()).take_all()
    seconds = time.perf_counter() - start
    hf_rows = generate(ds, model, EngineConfig(kind="transformers", batch_size=32, num_gpus=1), sampling,
                       system_prompt=system_prompt()).take_all()

    assert len(vllm_rows) == len(PROMPTS) and all(r["gen_error"] == "" for r in vllm_rows)
    assert all(r["generated_text"].strip() and r["num_generated_tokens"] > 0 for r in vllm_rows)
    by_id = {r["prompt_id"]: r["generated_text"] for r in hf_rows}
    agree = sum(r["generated_text"] == by_id[r["prompt_id"]] for r in vllm_rows) / len(vllm_rows)
    tokens = sum(r["num_generated_tokens"] for r in vllm_rows)
    print(f"vllm gpu: {tokens} tokens in {seconds:.1f} s incl. start = {tokens / seconds:.0f} tok/s; "
          f"greedy agreement with transformers {agree:.2f}")
    assert agree >= 0.5
