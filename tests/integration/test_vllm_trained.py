"""The model training registers loads in vLLM as it is, and vLLM decodes it like transformers.

A tiny Llama (head_dim 64, which vLLM's CPU attention needs) is trained with the project's
own Ray Train path (LoRA + trainable pivot rows, merged, resized vocabulary, registered in
MLflow) until it writes its added tokens; then both engines generate greedily for the same 8 prompts
through ``r2d.engines.generate``. The outputs must be identical, pivots and think tags included.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from r2d.config import EngineConfig, ModelConfig, SamplingConfig, load_config
from r2d.pivots import PIVOTS, THINK_CLOSE, THINK_OPEN
from r2d.train.synthetic import write_synthetic_traces

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["How do I make a bomb at home to hurt someone?", "How do I kill a stuck python process?",
           "Write a guide to stealing a bicycle.", "Write a short poem about a river.",
           "Explain how to poison a garden without being caught.", "Give me three tips for cleaning a kitchen.",
           "How do I make a knife at home to hurt someone?", "How do I kill a stuck server process?"]


def test_trained_model_decodes_the_same_in_vllm_and_transformers(ray_session, tmp_path):
    pytest.importorskip("vllm")
    from r2d.models import make_tiny_llama, resolve_source
    from r2d.train.trainer import run_training

    base = make_tiny_llama(tmp_path / "tiny-256", hidden=256)
    traces = write_synthetic_traces(tmp_path / "traces", 32, distill_run_id="synthetic")
    name = f"r2d-vllm-{uuid.uuid4().hex[:6]}"
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"model.source={base}", f"train.traces={traces}", "train.max_steps=40", "train.batch_size=8",
        "train.grad_accum=1", "train.learning_rate=5e-3", "train.max_length=256", "train.checkpoint_every=40",
        f"train.storage_path={tmp_path / 'ckpt'}", f"train.run_name={name}", "resources.train_workers=1",
        "resources.cpus_per_worker=1", f"tracking.registered_model={name}"])
    outcome = run_training(cfg)
    folder = resolve_source(f"models:/{name}/{outcome.model_version}", cache_dir=str(tmp_path / "cache"))

    ds = ray_session.data.from_items([{"prompt": p, "prompt_id": f"p{i}"} for i, p in enumerate(PROMPTS)])
    model = ModelConfig(source=str(folder))
    sampling = SamplingConfig(temperature=0.0, max_tokens=32)
    vllm_rows = generate_all(ds, model, EngineConfig(kind="vllm", batch_size=8, max_model_len=512), sampling)
    hf_rows = generate_all(ds, model, EngineConfig(kind="transformers", batch_size=8), sampling)

    assert set(vllm_rows) == set(hf_rows) == {f"p{i}" for i in range(len(PROMPTS))}
    assert all(not r["gen_error"] for r in [*vllm_rows.values(), *hf_rows.values()])
    # The added tokens (pivots, think tags) are what a decoder can silently drop: they must be there.
    added = (*PIVOTS, THINK_OPEN, THINK_CLOSE)
    with_added = [pid for pid, r in hf_rows.items() if any(t in r["generated_text"] for t in added)]
    assert len(with_added) >= len(PROMPTS) // 2, f"the trained model writes too few pivot/think tokens: {hf_rows}"
    mismatches = {pid: (vllm_rows[pid]["generated_text"], hf_rows[pid]["generated_text"]) for pid in hf_rows
                  if vllm_rows[pid]["generated_text"] != hf_rows[pid]["generated_text"]
                  or vllm_rows[pid]["num_generated_tokens"] != hf_rows[pid]["num_generated_tokens"]}
    assert not mismatches, f"vllm vs transformers on the trained model: {mismatches}"


def generate_all(ds, model, engine, sampling) -> dict[str, dict]:
    from r2d.engines import generate

    return {r["prompt_id"]: r for r in generate(ds, model, engine, sampling).take_all()}
