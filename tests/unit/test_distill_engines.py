"""Engines without Ray: the pivot-exempt repetition penalty, batched generation, and the OpenAI engine."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from r2d.config import EngineConfig, ModelConfig, SamplingConfig
from r2d.engines.openai_engine import OpenAIGenerator, parse_completion
from r2d.engines.rendering import exempt_token_ids, render_prompt
from r2d.engines.transformers_engine import TransformersGenerator, make_penalty_processor


def test_penalty_spares_pivot_logits():
    """Seen tokens 1 (logit 2.0), 2 (-1.0) and pivot 3 (4.0), penalty 2:
    2.0 -> 2.0/2 = 1.0, -1.0 -> -1.0*2 = -2.0, pivot 4.0 stays 4.0; unseen token 0 stays 0.5."""
    scores = torch.tensor([[0.5, 2.0, -1.0, 4.0]])
    input_ids = torch.tensor([[1, 2, 3, 3]])
    out = make_penalty_processor(2.0, exempt_ids=[3])(input_ids, scores.clone())
    assert torch.allclose(out, torch.tensor([[0.5, 1.0, -2.0, 4.0]]))
    plain = make_penalty_processor(2.0, exempt_ids=[])(input_ids, scores.clone())
    assert plain[0, 3].item() == pytest.approx(2.0)  # without the exemption the pivot is halved


def test_exempt_ids_are_the_single_pivot_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = exempt_token_ids(tok)
    assert tok.convert_tokens_to_ids("[SAFE]") in ids and tok.convert_tokens_to_ids("</think>") in ids
    assert len(ids) == 5


def test_render_prompt_uses_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = render_prompt(tok, "hello", system="be safe")
    assert text.startswith("<|im_start|>system\nbe safe<|im_end|>") and text.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_dir):
    return TransformersGenerator(ModelConfig(source=str(tiny_model_dir)), EngineConfig(batch_size=4, threads=1),
                                 SamplingConfig(max_tokens=12, repetition_penalty=1.2))


def test_batched_generation_equals_one_by_one(tiny_generator):
    """Left padding must not change a greedy continuation."""
    prompts = ["Hi", "Write a long poem about the sea and the wind", "How do I kill a Python process?"]
    batched = tiny_generator.generate_texts([render_prompt(tiny_generator.tokenizer, p) for p in prompts])
    alone = [tiny_generator.generate_texts([render_prompt(tiny_generator.tokenizer, p)])[0] for p in prompts]
    assert batched == alone
    assert all(n == 12 or text == "" for text, n, _ in batched)


def test_bad_rows_carry_an_error_and_keep_their_columns(tiny_generator):
    out = tiny_generator({"prompt": ["Hi", "", None], "prompt_id": ["a", "b", "c"]})
    assert list(out["prompt_id"]) == ["a", "b", "c"]
    assert out["gen_error"][0] == "" and out["num_generated_tokens"][0] > 0
    assert "empty prompt" in out["gen_error"][1] and "string or a list" in out["gen_error"][2]
    assert out["generated_text"][1] == "" and out["num_generated_tokens"][2] == 0


class _Server:
    """A tiny OpenAI-compatible endpoint: fails the first ``failures`` requests with HTTP 500."""

    def __init__(self, failures: int):
        self.failures, self.requests, self.headers = failures, [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if len(server.requests) <= server.failures:
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                reply = {"choices": [{"message": {"content": "Paris. [SAFE]", "reasoning_content": "Easy. [SAFE]"}}],
                         "usage": {"completion_tokens": 7}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()


SECRET = "sk-test-0123456789-secret"


def _engine(url, retries=3):
    return EngineConfig(kind="openai", base_url=url, api_model="teacher", api_key_env="R2D_TEST_API_KEY",
                        max_retries=retries, retry_backoff_s=0.01, timeout_s=5, request_concurrency=2)


def test_openai_engine_retries_sends_the_key_and_never_logs_it(monkeypatch, caplog):
    monkeypatch.setenv("R2D_TEST_API_KEY", SECRET)
    server = _Server(failures=1)
    try:
        gen = OpenAIGenerator(_engine(server.url), SamplingConfig(max_tokens=9), system_prompt="be safe")
        with caplog.at_level(logging.DEBUG):
            out = gen({"prompt": ["What is the capital of France?"], "prompt_id": ["x"]})
    finally:
        server.close()
    assert out["gen_error"][0] == ""
    assert out["generated_text"][0] == "<think>\nEasy. [SAFE]\n</think>\n\nParis. [SAFE]"
    assert out["num_generated_tokens"][0] == 7
    assert len(server.requests) == 2  # one 500, one retry
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)
    body = server.requests[-1]
    assert body["model"] == "teacher" and body["max_tokens"] == 9
    assert body["messages"] == [{"role": "system", "content": "be safe"},
                                {"role": "user", "content": "What is the capital of France?"}]
    assert "HTTP 500" in caplog.text and SECRET not in caplog.text


def test_openai_engine_gives_up_into_gen_error(monkeypatch, caplog):
    monkeypatch.setenv("R2D_TEST_API_KEY", SECRET)
    server = _Server(failures=100)
    try:
        gen = OpenAIGenerator(_engine(server.url, retries=2), SamplingConfig())
        with caplog.at_level(logging.DEBUG):
            out = gen({"prompt": ["q1", "q2"]})
    finally:
        server.close()
    assert len(server.requests) == 6  # 2 prompts x (1 try + 2 retries)
    assert all(e.startswith("EndpointError: HTTP 500") for e in out["gen_error"])
    assert SECRET not in caplog.text and all(SECRET not in e for e in out["gen_error"])


def test_parse_completion_rejects_a_reply_without_choices():
    from r2d.engines.openai_engine import EndpointError

    assert parse_completion({"choices": [{"message": {"content": "hi"}}]}) == ("hi", 0)
    with pytest.raises(EndpointError, match="choices"):
        parse_completion({"error": "x"})


def test_vllm_refuses_a_penalty_on_a_model_with_pivots(tmp_path):
    from r2d.engines.vllm_engine import check_penalty
    from transformers import AutoTokenizer

    from r2d.models import resolve_source
    from r2d.pivots import PIVOTS, add_pivot_tokens

    tok = AutoTokenizer.from_pretrained(resolve_source("bundled:smollm2-135m"))
    assert not any(p in tok.get_vocab() for p in PIVOTS)
    tok.save_pretrained(tmp_path / "base")
    check_penalty(str(tmp_path / "base"), SamplingConfig(repetition_penalty=1.2))  # no pivots: fine
    add_pivot_tokens(tok)
    tok.save_pretrained(tmp_path / "trained")
    check_penalty(str(tmp_path / "trained"), SamplingConfig(repetition_penalty=1.0))
    with pytest.raises(ValueError, match=r"sampling.repetition_penalty: got 1.2 .*use 1.0"):
        check_penalty(str(tmp_path / "trained"), SamplingConfig(repetition_penalty=1.2))


def test_vllm_cpu_engines_are_not_stacked_on_the_same_cores():
    from r2d.engines.vllm_engine import vllm_runtime_env

    one = vllm_runtime_env(EngineConfig(kind="vllm", num_cpus=2, concurrency=1))["env_vars"]
    # the thread count too: an actor that reserves no CPU (a Serve LLM replica) gets OMP_NUM_THREADS=1 from Ray
    assert one["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and one["OMP_NUM_THREADS"] == "2"
    many = vllm_runtime_env(EngineConfig(kind="vllm", num_cpus=2, concurrency=3))["env_vars"]
    assert many["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and many["OMP_NUM_THREADS"] == "2"
    gpu = vllm_runtime_env(EngineConfig(kind="vllm", num_gpus=1, concurrency=2))["env_vars"]
    assert gpu.get("VLLM_CPU_OMP_THREADS_BIND") != "nobind"
