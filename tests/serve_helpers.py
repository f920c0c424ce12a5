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


def register(folder: Path, name: str, alias: str | None = None, experiment: str = "serve-tests") -> str:
    """Log ``folder`` as a run's ``model/`` artifacts and register it as a new version of ``name``."""
    import mlflow
    from mlflow import MlflowClient

    from r2d.runtime import init_mlflow

    init_mlflow(experiment)
    client = MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def broken_copy(folder: Path, out_dir: Path, how: str) -> Path:
    """A copy of a model folder that fails to load (``weights``) or loads but cannot generate (``template``)."""
    import shutil

    shutil.copytree(folder, out_dir)
    if how == "weights":
        weights = out_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # the chat template raises: the model loads, its warm-up generation fails
        (out_dir / "chat_template.jinja").write_text("{{ raise_exception('this template is broken') }}")
        config = out_dir / "tokenizer_config.json"
        data = json.loads(config.read_text())
        data.pop("chat_template", None)
        config.write_text(json.dumps(data))
    return out_dir


# ---------------------------------------------------------------- checks shared by both engines' server tests

def _shaped(case, stream: bool, tokens: int, limit: int):
    """Stream half of the JSON-object cases (schemathesis leaves the optional ``stream`` out of most), and cap
    a valid max_tokens at ``tokens``: the servers allow long answers (their disconnect tests need them), and a
    fuzz case is about the request, not about generating hundreds of tokens."""
    if isinstance(case.body, dict):
        if stream:
            case.body["stream"] = True
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and tokens < value <= limit:
                case.body[key] = tokens - value % 3
    return case


def fuzz_with_schemathesis(base: str, headers: dict, cases: int, limit: int, other_cases: int = 60,
                           tokens: int = 12) -> dict:
    """Schemathesis over the server's own OpenAPI schema: ``cases`` chat requests, positive and negative.

    Every response must be below 500 and every error an OpenAI error body; returns counts
    (cases, streaming cases, 2xx) for the caller to check and report.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    chat = schema["/v1/chat/completions"]["POST"]
    seen = {"cases": 0, "stream": 0, "ok": 0, "statuses": {}}

    def check(case) -> None:
        response = case.call(base_url=base, headers=headers, timeout=120)
        seen["cases"] += 1
        seen["statuses"][response.status_code] = seen["statuses"].get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text[:500])
        if isinstance(case.body, dict) and case.body.get("stream") is True:
            seen["stream"] += 1
        if response.status_code < 300:
            seen["ok"] += 1
        elif response.status_code >= 400 and response.content:
            assert "message" in response.json()["error"], response.text[:500]

    modes = st.one_of(chat.as_strategy(GenerationMode.POSITIVE), chat.as_strategy(GenerationMode.NEGATIVE))
    modes = st.tuples(modes, st.booleans()).map(lambda pair: _shaped(pair[0], pair[1], tokens, limit))
    quiet = {"deadline": None, "derandomize": True, "suppress_health_check": list(HealthCheck), "database": None}
    given(modes)(settings(max_examples=cases, **quiet)(lambda case: check(case)))()
    others = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    given(others)(settings(max_examples=other_cases, **quiet)(lambda case: check(case)))()
    return seen


def check_streams_add_up(base: str, headers: dict, clients: int = 32, max_tokens: int = 8,
                         mode: str | None = None) -> None:
    """``clients`` concurrent streams: each complete (no error event, a finish chunk, [DONE]) and equal,
    greedy, to the same question answered without streaming."""
    import asyncio

    import httpx

    def body(i: int, stream: bool) -> dict:
        return {"messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": max_tokens,
                "stream": stream, "temperature": 0, **({"r2d_mode": mode} if mode else {})}

    async def run(stream: bool) -> list:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body(i, stream),
                                                      headers=headers) for i in range(clients)))

    whole = asyncio.run(run(False))
    streamed = asyncio.run(run(True))
    for i, (w, s) in enumerate(zip(whole, streamed)):
        assert w.status_code == 200 and s.status_code == 200, (w.text, s.text)
        events = sse_events(s.text)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1] if isinstance(e, dict)), s.text
        chunks = [e for e in events[:-1] if e.get("choices")]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), s.text
        delta = [c["choices"][0]["delta"] for c in chunks]
        message = w.json()["choices"][0]["message"]
        assert "".join(d.get("content", "") for d in delta) == message["content"], i
        assert "".join(d.get("reasoning_content", "") for d in delta) == (message["reasoning_content"] or ""), i


def check_disconnect_stops_generation(base: str, headers: dict, info, tokens: int) -> tuple[float, float]:
    """Leave a streaming and a plain request early; return the seconds until the engine had nothing running."""
    import time

    import httpx

    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": tokens}
    took = []
    for stream in (True, False):
        if stream:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                              timeout=120) as r:
                lines = r.iter_lines()
                next(lines)
                time.sleep(0.5)
                assert info()["active"] >= 1
        else:
            try:
                # A tiny model on an idle machine writes the whole answer in about a second: leave sooner.
                httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=0.25)
                raise AssertionError("the plain request finished before the client left")
            except httpx.ReadTimeout:
                pass
        left = time.perf_counter()
        while info()["active"]:
            assert time.perf_counter() - left < 10, f"still generating for a client that left: {info()}"
            time.sleep(0.02)
        took.append(time.perf_counter() - left)
    return took[0], took[1]
