"""The Serve application on the transformers engine: registry source, openai client, limits, load, fuzz, reload."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import make_forced_unsafe_model

from r2d.config import load_config
from r2d.serve.pivot_modes import REFUSAL

pytestmark = pytest.mark.integration
MODEL = "r2d-serve-it"
KEY = "integration-key"
CHAT = {"model": "r2d", "messages": [{"role": "user", "content": "How do I bake bread?"}], "max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(folder, alias: str | None = None) -> str:
    import mlflow
    from mlflow import MlflowClient

    from r2d.runtime import init_mlflow

    init_mlflow("serve-tests")
    client = MlflowClient()
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    version = client.create_model_version(MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    if alias:
        client.set_registered_model_alias(MODEL, alias, version.version)
    return version.version


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir, tmp_path_factory, monkeypatch_module):
    from ray import serve

    from r2d.serve.app import build_app

    forced = make_forced_unsafe_model(tiny_model_dir, tmp_path_factory.mktemp("forced") / "unsafe")
    v1 = _register(tiny_model_dir, alias="champion")
    v2 = _register(forced)
    monkeypatch_module.setenv("R2D_API_KEY", KEY)
    port = _free_port()
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"serve.model=models:/{MODEL}@champion", f"model.cache_dir={tmp_path_factory.mktemp('cache')}",
        f"serve.port={port}", "serve.engine.num_cpus=1", "serve.max_tokens_limit=64", "serve.default_max_tokens=8",
        "serve.engine.max_model_len=256", "serve.engine.batch_size=32", "serve.max_body_bytes=8192"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while httpx.get(f"{base}/healthz").status_code != 200:
        assert time.time() < deadline, "the server never became ready"
        time.sleep(0.5)
    yield {"base": base, "v1": v1, "v2": v2}
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_openai_client_plain_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server["base"] + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["r2d"]
    resp = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8, temperature=0)
    message = resp.choices[0].message
    assert isinstance(message.content, str) and 1 <= resp.usage.completion_tokens <= 8
    assert resp.model_extra["r2d"]["mode"] == "hide"
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"]
    stream = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8, stream=True,
                                            extra_body={"r2d_mode": "show"})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    shown = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8,
                                           extra_body={"r2d_mode": "show"})
    assert streamed == shown.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_auth_and_limits(server):
    url = server["base"] + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT).status_code == 401
    assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
    big = {**CHAT, "messages": [{"role": "user", "content": "z" * 9000}]}
    assert httpx.post(url, json=big, headers=_headers()).status_code == 413
    assert httpx.post(url, json={**CHAT, "max_tokens": 65}, headers=_headers()).status_code == 422
    assert httpx.post(url, json={**CHAT, "max_tokens": "8"}, headers=_headers()).status_code == 422
    bad = httpx.post(url, content=b'{"messages": [', headers={**_headers(), "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_32_concurrent_clients(server):
    async def one(client, i):
        body = {**CHAT, "messages": [{"role": "user", "content": f"Question number {i}?"}], "stream": i % 2 == 0}
        r = await client.post(server["base"] + "/v1/chat/completions", json=body, headers=_headers())
        return r.status_code, r.text

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert [status for status, _ in results] == [200] * 32
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in results[::2])
    assert all(json.loads(text)["usage"]["completion_tokens"] >= 1 for _, text in results[1::2])


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                     | st.text(max_size=20), lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
_FIELDS = st.sampled_from(["model", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "r2d_mode",
                           "stream_options", "max_completion_tokens", "seed"])


@st.composite
def hostile_bodies(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # any JSON at all
        return json.dumps(draw(_JSON)).encode()
    if kind == 1:  # raw bytes, often not JSON or not UTF-8
        return draw(st.binary(max_size=64))
    body = dict(CHAT, max_tokens=4)
    for field in draw(st.lists(_FIELDS, max_size=3)):  # a valid request with fields replaced by junk
        body[field] = draw(_JSON)
    if kind == 3:
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "assistant", "tool", "x"])),
                             "content": draw(st.text(max_size=40) | _JSON)}]
    return json.dumps(body).encode()


def test_fuzz_no_5xx_and_alive_after(server):
    url = server["base"] + "/v1/chat/completions"
    statuses = []

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(hostile_bodies(), st.sampled_from(["application/json", "text/plain", ""]))
    def probe(body, content_type):
        r = httpx.post(url, content=body, headers={**_headers(), "content-type": content_type}, timeout=60)
        statuses.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert "message" in r.json()["error"]

    started = time.time()
    probe()
    assert time.time() - started < 90
    assert len(statuses) >= 100 and any(s == 200 for s in statuses) and any(s >= 400 for s in statuses)
    assert httpx.get(server["base"] + "/healthz").status_code == 200
    assert httpx.post(url, json=CHAT, headers=_headers()).status_code == 200


def test_reload_follows_the_alias_and_guard_refuses(server):
    """Move champion to the model forced to say [UNSAFE]; a stream in flight survives the reload."""
    from mlflow import MlflowClient

    url = server["base"] + "/v1/chat/completions"
    guard = {**CHAT, "r2d_mode": "guard"}
    before = httpx.post(url, json=guard, headers=_headers()).json()
    assert before["r2d"]["pivots"]["unsafe"] < 8

    async def stream_during_reload():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {**CHAT, "max_tokens": 64, "stream": True, "r2d_mode": "show"}
            streaming = asyncio.ensure_future(client.post(url, json=body, headers=_headers()))
            await asyncio.sleep(0.05)
            MlflowClient().set_registered_model_alias(MODEL, "champion", server["v2"])
            reload = await client.post(server["base"] + "/admin/reload", headers=_headers())
            return await streaming, reload

    streamed, reload = asyncio.run(stream_during_reload())
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert reload.status_code == 200 and reload.json()["version"] == f"models:/{MODEL}/{server['v2']}"
    after = httpx.post(url, json=guard, headers=_headers()).json()
    assert after["choices"][0]["message"]["content"] == REFUSAL
    assert after["r2d"] == {"mode": "guard", "pivots": {"safe": 0, "unsafe": 8, "rethink": 0}, "guarded": True,
                            "guard_reason": "unsafe_answer"}
    models = httpx.get(server["base"] + "/v1/models", headers=_headers()).json()
    assert models["data"][0]["root"] == f"models:/{MODEL}/{server['v2']}"
