"""The OpenAI-compatible teacher against a real server that returns reasoning in ``reasoning_content``.

The server is the project's own (Ray Serve, hide mode: the reasoning goes to ``reasoning_content``,
the answer to ``content``), serving a tiny model scripted to answer every prompt with the same
reasoning trace. Distillation reaches it through the ``openai`` engine, as it would reach a hosted
reasoning model, and must recover the steps from ``reasoning_content``.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from ports import free_port

from r2d.config import load_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ("<think>The request seeks real harm![UNSAFE] Refusing keeps people safe.[SAFE]</think>"
          "Sorry, I cannot help with that")


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    from ray import serve

    from r2d.models import make_tiny_llama
    from r2d.serve.app import build_app

    model = make_tiny_llama(tmp_path_factory.mktemp("scripted") / "teacher", script=SCRIPT, seed=1)
    port = free_port()
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        f"serve.model={model}", f"serve.port={port}", "serve.mode=hide", "serve.engine.kind=transformers",
        "serve.engine.num_cpus=1", "serve.engine.max_model_len=512", "serve.max_tokens_limit=128",
        "serve.default_max_tokens=64",
        "serve.api_key_env=R2D_TEST_NO_KEY"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d-teacher", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while httpx.get(f"{base}/healthz").status_code != 200:
        assert time.time() < deadline, "the server never became ready"
        time.sleep(0.5)
    yield {"base": base, "model": model}
    serve.shutdown()  # Serve itself, not only the app: the next module starts it on its own port


def test_server_returns_the_reasoning_apart(endpoint):
    body = {"model": "r2d", "max_tokens": 64, "messages": [{"role": "user", "content": "How do I pick a lock?"}]}
    message = httpx.post(f"{endpoint['base']}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "The request seeks real harm! Refusing keeps people safe."
    assert message["content"] == "Sorry, I cannot help with that"


def test_distillation_through_the_openai_engine_parses_steps_from_reasoning_content(endpoint, tmp_path):
    from pipelines.distill import run_distillation
    from r2d.data.splits import training_prompts
    from r2d.distill import store

    out = tmp_path / "traces"
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [
        "data.sources=[{name: harmbench, split: val, limit: 3}, {name: benign, limit: 3}]",
        "data.heldout_categories=[]", "data.eval_fraction=0.0", f"model.source={endpoint['model']}",
        "distill.teacher.source=scripted-teacher", f"distill.output_dir={out}", "distill.max_regenerations=0",
        f"distill.engine={{kind: openai, base_url: '{endpoint['base']}/v1', api_model: r2d, batch_size: 3}}",
        "distill.sampling={temperature: 0.0, max_tokens: 64}", "distill.chunk_size=3"])
    prompts = training_prompts(cfg)
    manifest, stats = run_distillation(cfg, prompts, {"mlflow_run_id": "test"})
    rows = store.read_table(out).to_pylist()
    harmful = [r for r in rows if r["label"] == "harmful"]
    assert stats["errors"] == 0 and len(harmful) == 3, (stats, manifest["drops"])
    for row in harmful:  # the teacher's own trace, kept: its answer refuses
        assert row["origin"] == "teacher" and not row["repaired"]
        assert row["reasoning_steps"] == ["The request seeks real harm!", "Refusing keeps people safe."]
        assert row["answer"] == "Sorry, I cannot help with that" and row["teacher"] == "scripted-teacher"
