"""The Serve application on the transformers engine: registry source, keys, modes, limits, load, fuzz, reload,
batches that survive a bad request, and a client that leaves."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ports import free_port
from serve_helpers import (check_disconnect_stops_generation, check_streams_add_up, fuzz_with_schemathesis,
                           make_forced_unsafe_model, register)

from r2d.config import load_config
from r2d.serve.pivot_modes import REFUSAL
from r2d.serve.schemas import GenRequest

pytestmark = pytest.mark.integration
MODEL = "r2d-serve-it"
KEY, ADMIN = "integration-key", "integration-admin-key"
LIMIT = 400
CHAT = {"model": "r2d", "messages": [{"role": "user", "content": "How do I bake bread?"}], "max_tokens": 8}
FUZZ_CASES = 1000


@pytest.fixture(scope="module")
def server(ray_session, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from r2d.serve.app import build_app

    forced = make_forced_unsafe_model(tiny_model_dir, tmp_path_factory.mktemp("forced") / "unsafe")
    v1 = register(tiny_model_dir, MODEL, alias="champion")
    v2 = register(forced, MODEL)
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api").write_text(KEY)
    (keys / "admin").write_text(ADMIN)
    port = free_port()
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"serve.model=models:/{MODEL}@champion", f"model.cache_dir={tmp_path_factory.mktemp('cache')}",
        f"serve.port={port}", "serve.engine.kind=transformers", "serve.engine.num_cpus=1", f"serve.max_tokens_limit={LIMIT}",
        "serve.default_max_tokens=8", "serve.engine.max_model_len=512", "serve.engine.batch_size=32",
        "serve.max_body_bytes=8192", f"serve.api_key_file={keys / 'api'}", f"serve.admin_key_file={keys / 'admin'}",
        "serve.allowed_modes=[show, guard]"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while httpx.get(f"{base}/healthz").status_code != 200:
        assert time.time() < deadline, "the server never became ready"
        time.sleep(0.5)
    yield {"base": base, "v1": v1, "v2": v2, "engine": serve.get_deployment_handle("r2d-transformers", "r2d")}
    serve.shutdown()


def _headers(admin: bool = False) -> dict:
    return {"Authorization": f"Bearer {KEY}", **({"X-R2D-Admin-Key": ADMIN} if admin else {})}


def _info(server) -> dict:
    return server["engine"].info.remote().result()


def test_openai_client_plain_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server["base"] + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["r2d"]
    resp = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8, temperature=0)
    message = resp.choices[0].message
    assert isinstance(message.content, str) and 1 <= resp.usage.completion_tokens <= 8
    assert resp.model_extra["r2d"]["mode"] == "hide"
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"]
    show = {"extra_body": {"r2d_mode": "show"}, "extra_headers": {"X-R2D-Admin-Key": ADMIN}}
    stream = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8, stream=True, **show)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    shown = client.chat.completions.create(model="r2d", messages=CHAT["messages"], max_tokens=8, **show)
    assert streamed == shown.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_auth_modes_and_limits(server):
    url = server["base"] + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT).status_code == 401
    assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json={**CHAT, "r2d_mode": "show"}, headers=_headers()).status_code == 403
    assert httpx.post(url, json={**CHAT, "r2d_mode": "show"}, headers=_headers(admin=True)).status_code == 200
    assert httpx.post(server["base"] + "/admin/reload", headers=_headers()).status_code == 401
    big = {**CHAT, "messages": [{"role": "user", "content": "z" * 9000}]}
    assert httpx.post(url, json=big, headers=_headers()).status_code == 413
    assert httpx.post(url, json={**CHAT, "max_tokens": LIMIT + 1}, headers=_headers()).status_code == 422
    assert httpx.post(url, json={**CHAT, "max_tokens": "8"}, headers=_headers()).status_code == 422
    for bad in ({"seed": 2**70}, {"temperature": 1e-300}):
        assert httpx.post(url, json={**CHAT, **bad}, headers=_headers()).status_code == 422
    plain = httpx.post(url, content=b'{"messages": []}', headers={**_headers(), "content-type": "text/plain"})
    assert plain.status_code == 415
    bad = httpx.post(url, content=b'{"messages": [', headers={**_headers(), "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_one_bad_request_never_fails_its_batch(server):
    """Values the ingress refuses, sent straight to the engine deployment in one @serve.batch with good ones."""
    msgs = [{"role": "user", "content": "Hello"}]
    reqs = [GenRequest(msgs, 6), GenRequest(msgs, 6, temperature=0.7, seed=2**70), GenRequest(msgs, 6, temperature=1e-300),
            GenRequest(msgs, 6, temperature=0.9, seed=11), GenRequest(msgs, 6)]
    streams = [server["engine"].options(stream=True).generate.remote(r) for r in reqs]  # submitted together
    outs = [list(s) for s in streams]
    errors = [next((d.error for d in out if d.error), None) for out in outs]
    assert [e.split(":")[0] if e else None for e in errors] == [None, "seed", "temperature", None, None]
    for i in (0, 3, 4):
        assert outs[i][-1].finish_reason in ("stop", "length") and "".join(d.text for d in outs[i])
    assert "".join(d.text for d in outs[0]) == "".join(d.text for d in outs[4])


def test_32_concurrent_streams_are_complete(server):
    check_streams_add_up(server["base"], _headers(), clients=32)


def test_schemathesis_fuzz_no_5xx_and_alive_after(server):
    started = time.perf_counter()
    seen = fuzz_with_schemathesis(server["base"], _headers(), FUZZ_CASES, LIMIT)
    took = time.perf_counter() - started
    print(f"schemathesis on transformers: {seen['cases']} cases ({seen['stream']} streaming, {seen['ok']} 2xx) "
          f"in {took:.0f} s; statuses {seen['statuses']}")
    assert seen["cases"] >= FUZZ_CASES and seen["stream"] >= 100 and seen["ok"] >= 100, seen
    assert httpx.get(server["base"] + "/healthz").status_code == 200
    assert httpx.post(server["base"] + "/v1/chat/completions", json=CHAT, headers=_headers()).status_code == 200


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
            streaming = asyncio.ensure_future(client.post(url, json=body, headers=_headers(admin=True)))
            await asyncio.sleep(0.05)
            MlflowClient().set_registered_model_alias(MODEL, "champion", server["v2"])
            reload = await client.post(server["base"] + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
            return await streaming, reload

    streamed, reload = asyncio.run(stream_during_reload())
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert reload.status_code == 200 and reload.json()["version"] == f"models:/{MODEL}/{server['v2']}"
    after = httpx.post(url, json=guard, headers=_headers()).json()
    assert after["choices"][0]["message"]["content"] == REFUSAL
    assert after["r2d"] == {"mode": "guard", "pivots": {"safe": 0, "unsafe": 8, "rethink": 0}, "guarded": True,
                            "guard_reason": "unsafe_answer", "redacted_steps": 0}
    models = httpx.get(server["base"] + "/v1/models", headers=_headers()).json()
    assert models["data"][0]["root"] == f"models:/{MODEL}/{server['v2']}"


def test_a_client_that_leaves_stops_its_generation(server):
    """After the reload above the model never stops by itself: only the client leaving can end it early."""
    assert _info(server)["version"] == f"models:/{MODEL}/{server['v2']}"
    stream_s, plain_s = check_disconnect_stops_generation(server["base"], _headers(), lambda: _info(server), LIMIT)
    print(f"transformers: generation stopped {stream_s:.2f} s (stream) and {plain_s:.2f} s (plain) after the "
          "client left")
    assert stream_s < 1.0 and plain_s < 1.0
