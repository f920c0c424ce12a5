"""The HTTP API in-process (FastAPI TestClient, no Ray) on the real tiny model."""

from __future__ import annotations

import json
import logging
import time

import pytest
from fastapi.testclient import TestClient
from serve_helpers import make_forced_unsafe_model, sse_events

from r2d.config import EngineConfig, ServeConfig
from r2d.serve.api import LocalClient, create_api
from r2d.serve.pivot_modes import REFUSAL
from r2d.serve.transformers_backend import TransformersEngine

CHAT = {"model": "r2d", "messages": [{"role": "user", "content": "How do I bake bread?"}], "max_tokens": 6}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return TransformersEngine(str(tiny_model_dir), max_model_len=256, threads=1)


@pytest.fixture(scope="module")
def forced_engine(tiny_model_dir, tmp_path_factory):
    folder = make_forced_unsafe_model(tiny_model_dir, tmp_path_factory.mktemp("forced") / "unsafe")
    return TransformersEngine(str(folder), max_model_len=256, threads=1)


def make_client(engine, **overrides) -> TestClient:
    cfg = ServeConfig(**{"max_tokens_limit": 64, "default_max_tokens": 8, "engine": EngineConfig(max_model_len=256),
                         "api_key_env": "", "admin_key_env": "", **overrides})
    return TestClient(create_api(cfg, LocalClient(engine)))


def test_completion_shape_and_metadata(engine):
    client = make_client(engine)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "r2d"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert "reasoning_content" in message and message["reasoning"] == message["reasoning_content"]
    assert 1 <= body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["r2d"]["mode"] == "hide" and set(body["r2d"]["pivots"]) == {"safe", "unsafe", "rethink"}


def test_stream_adds_up_to_the_non_streaming_answer(engine):
    """Greedy decoding: the streamed deltas must concatenate to the non-streaming content."""
    client = make_client(engine, mode="show")
    full = client.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "show"}).json()
    r = client.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "show", "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == full["usage"]


def test_guard_refuses_when_the_model_says_unsafe(forced_engine, monkeypatch):
    monkeypatch.setenv("R2D_TEST_ADMIN", "admin-s3cret")
    client = make_client(forced_engine, mode="guard", allowed_modes=["show"], admin_key_env="R2D_TEST_ADMIN")
    guarded = client.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "guard"}).json()
    assert guarded["choices"][0]["message"]["content"] == REFUSAL
    assert guarded["r2d"]["guarded"] is True and guarded["r2d"]["guard_reason"] == "unsafe_answer"
    assert guarded["r2d"]["pivots"]["unsafe"] == 6
    shown = client.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "show"},
                        headers={"X-R2D-Admin-Key": "admin-s3cret"}).json()
    assert shown["choices"][0]["message"]["content"] == "[UNSAFE]" * 6
    stream = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(stream.text)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))
    assert content == REFUSAL and events[-2]["r2d"]["guarded"] is True
    metrics = client.app.state.r2d.metrics
    assert metrics.total("r2d_serve_guard_refusals") == 2
    assert metrics.total("r2d_serve_pivots") == 18


def test_clients_get_the_configured_mode_and_weaker_ones_need_the_admin_key(forced_engine, monkeypatch):
    """A server configured to guard cannot be switched to show by a client."""
    monkeypatch.setenv("R2D_TEST_ADMIN", "admin-s3cret")
    strict = make_client(forced_engine, mode="guard", admin_key_env="R2D_TEST_ADMIN")
    assert strict.post("/v1/chat/completions", json=CHAT).json()["r2d"]["mode"] == "guard"
    for mode in ("show", "hide"):
        r = strict.post("/v1/chat/completions", json={**CHAT, "r2d_mode": mode},
                        headers={"X-R2D-Admin-Key": "admin-s3cret"})  # not listed: even the admin key cannot
        assert r.status_code == 403 and "not allowed" in r.json()["error"]["message"], r.text
    listed = make_client(forced_engine, mode="guard", allowed_modes=["show"], admin_key_env="R2D_TEST_ADMIN")
    for headers in ({}, {"X-R2D-Admin-Key": "wrong"}):
        r = listed.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "show"}, headers=headers)
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"], r.text
    ok = listed.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "show"},
                     headers={"X-R2D-Admin-Key": "admin-s3cret"})
    assert ok.status_code == 200 and ok.json()["r2d"]["mode"] == "show"
    # A stronger mode than the configured one only needs to be listed.
    hiding = make_client(forced_engine, mode="hide", allowed_modes=["guard"])
    assert hiding.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "guard"}).json()["r2d"]["guarded"] is True
    r = hiding.post("/v1/chat/completions", json={**CHAT, "r2d_mode": "loud"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "r2d_mode"


@pytest.mark.parametrize("payload, status, needle", [
    ({**CHAT, "max_tokens": "5"}, 422, "max_tokens"),
    ({**CHAT, "messages": "hello"}, 422, "messages"),
    ({**CHAT, "messages": []}, 422, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ({**CHAT, "messages": [{"role": "user", "content": 42}]}, 422, "content"),
    ({**CHAT, "temperature": 5}, 422, "temperature"),
    ({**CHAT, "temperature": 1e-300}, 422, "temperature"),
    ({**CHAT, "seed": 2**70}, 422, "seed"),
    ({**CHAT, "seed": -1}, 422, "seed"),
    ({**CHAT, "top_p": 1e-300}, 422, "top_p"),
    ({**CHAT, "max_tokens": 0}, 422, "max_tokens"),
    ({**CHAT, "max_tokens": 65}, 422, "limit is 64"),
    ({**CHAT, "messages": [{"role": "user", "content": "x"}] * 65}, 422, "limit is 64"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 16001}]}, 422, "16000"),
    ({**CHAT, "n": 9}, 422, "n: 9 choices; the limit is 8"),
    ({**CHAT, "n": 0}, 422, "n"),
    ({**CHAT, "n": "2"}, 422, "n"),
    ({**CHAT, "model": "gpt-4"}, 404, "does not exist"),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 300}]}, 400, "context"),
])
def test_bad_requests_get_a_reason(engine, payload, status, needle):
    r = make_client(engine).post("/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_malformed_and_oversized_bodies(engine):
    client = make_client(engine, max_body_bytes=2048)
    for content_type in ("text/plain", "", "application/x-www-form-urlencoded", "application/jsonx"):
        r = client.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": content_type})
        assert r.status_code == 415 and "JSON" in r.json()["error"]["message"], content_type
    json_like = {"content-type": "application/vnd.api+json; charset=utf-8"}
    assert client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=json_like).status_code == 200
    headers = {"content-type": "application/json"}
    assert client.post("/v1/chat/completions", content=b"{not json", headers=headers).status_code == 400
    assert client.post("/v1/chat/completions", content=b"[1, 2]", headers=headers).status_code == 400
    assert client.post("/v1/chat/completions", content=b"\xff\xfe", headers=headers).status_code == 400
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "y" * 4000}]})
    r = client.post("/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 413 and "2048" in r.json()["error"]["message"]


def test_unknown_openai_parameters_are_ignored(engine):
    extra = {"logprobs": False, "user": "u1", "presence_penalty": 0.0, "tools": [], "response_format": {"type": "text"},
             "messages": [{"role": "developer", "content": "Be brief.", "name": "x"},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    r = make_client(engine).post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 200, r.text


def test_api_key(engine, monkeypatch):
    monkeypatch.setenv("R2D_TEST_KEY", "s3cret")
    client = make_client(engine, api_key_env="R2D_TEST_KEY")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    wrong = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.post("/admin/reload").status_code == 403  # no admin key configured: the admin API is off
    assert client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"}).status_code == 403
    ok = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # 401 comes before 415: an anonymous client learns nothing about the API
    assert client.post("/v1/chat/completions", content=b"x", headers={"content-type": "text/plain"}).status_code == 401


def test_admin_key_is_separate_and_read_from_a_file(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("R2D_TEST_KEY", "s3cret")
    (tmp_path / "admin").write_text("admin-from-file\n")
    client = make_client(engine, api_key_env="R2D_TEST_KEY", admin_key_file=str(tmp_path / "admin"))
    assert client.post("/admin/reload", headers={"Authorization": "Bearer s3cret"}).status_code == 401
    r = client.post("/admin/reload", headers={"Authorization": "Bearer admin-from-file"})
    assert r.status_code == 200 and r.json()["reloaded"] is True
    chat = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer admin-from-file"})
    assert chat.status_code == 401  # the admin key is not an API key


def test_a_public_address_without_a_key_is_refused(engine, tmp_path, monkeypatch, caplog):
    from r2d.serve.auth import AuthConfigError, preflight

    monkeypatch.delenv("R2D_API_KEY", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        with pytest.raises(AuthConfigError, match=f"serve.host: got '{host}'.*no API key"):
            make_client(engine, host=host)
        with pytest.raises(AuthConfigError, match="serve.host"):
            preflight(ServeConfig(host=host))
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        make_client(engine, host=host)
    (tmp_path / "key").write_text("k")
    make_client(engine, host="0.0.0.0", api_key_file=str(tmp_path / "key"))
    with pytest.raises(AuthConfigError, match="cannot be read"):
        make_client(engine, host="127.0.0.1", api_key_file=str(tmp_path / "missing"))  # a typo never disables auth
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthConfigError, match="is empty"):
        make_client(engine, api_key_file=str(tmp_path / "empty"))
    with caplog.at_level(logging.WARNING, logger="r2d.serve"):
        make_client(engine, host="0.0.0.0", insecure=True)
    assert "INSECURE" in caplog.text


def test_models_health_and_reload(engine, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("R2D_TEST_ADMIN", "admin")
    client = make_client(engine, served_model_name="defended", admin_key_env="R2D_TEST_ADMIN")
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["defended"] and models["data"][0]["root"] == str(tiny_model_dir)
    first = client.get("/healthz")
    deadline = time.time() + 30
    while client.get("/healthz").status_code != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert first.status_code in (200, 503)
    before = engine._current
    r = client.post("/admin/reload", headers={"Authorization": "Bearer admin"})
    assert r.status_code == 200 and r.json()["reloaded"] is True
    assert engine._current is not before and engine._current.version == before.version


def test_prompts_stay_out_of_logs_unless_configured(engine, caplog):
    secret = {**CHAT, "messages": [{"role": "user", "content": "SECRET-PROMPT-7731"}]}
    with caplog.at_level(logging.INFO, logger="r2d.serve"):
        make_client(engine).post("/v1/chat/completions", json=secret)
    assert "request" in caplog.text and "SECRET-PROMPT-7731" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="r2d.serve"):
        make_client(engine, log_prompts=True).post("/v1/chat/completions", json=secret)
    assert "SECRET-PROMPT-7731" in caplog.text


def test_engine_batches_concurrent_requests(engine):
    """One stream_batch call serves several requests: each gets its own greedy answer, as if alone."""
    import asyncio

    from r2d.serve.schemas import GenRequest

    prompts = ["Hello", "Write a poem about the sea", "2+2?"]
    reqs = [GenRequest([{"role": "user", "content": p}], max_tokens=4 + i) for i, p in enumerate(prompts)]

    async def run_batch():
        texts = [""] * len(reqs)
        async for step in engine.stream_batch(reqs):
            assert len(step) == len(reqs)
            for i, delta in enumerate(step):
                if delta is not StopIteration:
                    texts[i] += delta.text
        return texts

    async def run_alone(req):
        return "".join([d.text async for d in engine.stream_one(req)])

    batched = asyncio.run(run_batch())
    alone = [asyncio.run(run_alone(r)) for r in reqs]
    assert batched == alone


def test_sampled_and_greedy_rows_share_a_batch(engine):
    """A sampled row does not disturb a greedy row in the same batch; a seeded sampled row repeats."""
    import asyncio

    from r2d.serve.schemas import GenRequest

    greedy = GenRequest([{"role": "user", "content": "Hello"}], max_tokens=6)
    sampled = GenRequest([{"role": "user", "content": "Hello"}], max_tokens=6, temperature=1.5, top_p=0.9, seed=3)

    async def run(reqs):
        texts = [""] * len(reqs)
        async for step in engine.stream_batch(reqs):
            for i, delta in enumerate(step):
                if delta is not StopIteration:
                    texts[i] += delta.text
        return texts

    alone = asyncio.run(run([greedy]))[0]
    first, second = asyncio.run(run([greedy, sampled])), asyncio.run(run([greedy, sampled]))
    assert first[0] == alone and first == second
    assert first[1] != alone  # temperature 1.5 on a random model: the sampled text differs from greedy


def test_whole_completions_cross_as_one_delta(engine):
    """A non-streaming request gets one merged delta from the replica; streaming gets one per token."""
    import asyncio

    from r2d.serve.schemas import Delta, GenRequest, deliver, merge

    async def collect(req):
        return [d async for d in LocalClient(engine).stream(req)]

    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    pieces = asyncio.run(collect(GenRequest(msgs, max_tokens=6, stream=True)))
    whole = asyncio.run(collect(GenRequest(msgs, max_tokens=6, stream=False)))
    assert len(pieces) >= 6 and len(whole) == 1
    assert whole[0].text == "".join(d.text for d in pieces)
    assert (whole[0].finish_reason, whole[0].completion_tokens) == (pieces[-1].finish_reason, 6)

    # merge keeps the first error and the latest counts
    assert merge(Delta("a", None, 3, 1), Delta("b", "stop", 3, 2)) == Delta("ab", "stop", 3, 2)
    assert merge(Delta("", "error", error="too long"), Delta("x", "stop", 1, 1)).error == "too long"

    async def nothing():
        return
        yield

    async def drain(stream):
        return [d async for d in deliver(stream, False)]

    assert asyncio.run(drain(nothing())) == []
