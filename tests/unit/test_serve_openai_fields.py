"""OpenAI request fields: ``stop``, ``n`` and the repetition penalties are honoured on every path; a field the
server cannot honour is a 400 naming it.

The official ``openai`` client drives the real app in-process (FastAPI's TestClient is the
client's httpx transport) on the tiny model with greedy decoding, so an answer with a stop
string can be checked against the same answer without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import openai
import pytest
from fastapi.testclient import TestClient
from serve_helpers import make_forced_unsafe_model

from r2d.config import EngineConfig, ServeConfig
from r2d.serve.api import LocalClient, create_api
from r2d.serve.schemas import Delta
from r2d.serve.transformers_backend import TransformersEngine
from r2d.serve.transport import until_stop

MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return TransformersEngine(str(tiny_model_dir), max_model_len=256, threads=1)


def _openai_client(engine, mode: str) -> openai.OpenAI:
    cfg = ServeConfig(max_tokens_limit=64, default_max_tokens=8, engine=EngineConfig(max_model_len=256),
                      api_key_env="", admin_key_env="", mode=mode)
    http = TestClient(create_api(cfg, LocalClient(engine)))
    return openai.OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def client(engine):
    return _openai_client(engine, "show")


def _cut(pieces: list[str], stops: list[str], finish: str = "length") -> list[Delta]:
    async def source():
        for i, text in enumerate(pieces):
            yield Delta(text, finish if i == len(pieces) - 1 else None, 3, i + 1)

    async def collect():
        return [d async for d in until_stop(source(), stops)]

    return asyncio.run(collect())


def test_a_stop_string_split_across_deltas_never_reaches_the_client():
    out = _cut(["The an", "swer: ST", "OP and more"], ["STOP"])
    assert [d.text for d in out] == ["The", " answer:", " "]  # 3 characters held back each time
    assert out[-1].finish_reason == "stop" and out[-1].stop_string == "STOP" and out[-1].completion_tokens == 3


def test_the_earliest_of_several_stops_wins_and_no_match_keeps_every_character():
    assert "".join(d.text for d in _cut(["abc", "def", "ghi"], ["gh", "cd"])) == "ab"
    out = _cut(["abc", "dST", "x"], ["STOP", "zz"])  # "ST" held back, then released at the end
    assert "".join(d.text for d in out) == "abcdSTx" and out[-1].finish_reason == "length"
    assert out[-1].stop_string is None


def test_an_engine_error_passes_through_a_stop_cut():
    async def source():
        yield Delta("", "error", error="seed: too large", param="seed")

    async def collect():
        return [d async for d in until_stop(source(), ["x"])]

    assert asyncio.run(collect())[0].error == "seed: too large"


def test_stop_through_the_official_client_plain_and_streamed(client, engine):
    full = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 8, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]

    cut = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stop=stop, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_the_engine_stops_at_the_stop_string_not_at_max_tokens(tiny_model_dir, tmp_path_factory, stream):
    """A model forced to write [UNSAFE] forever, 1,900 tokens allowed: the stop must end the generation too."""
    forced = TransformersEngine(str(make_forced_unsafe_model(tiny_model_dir, tmp_path_factory.mktemp("f") / "m")),
                                max_model_len=2048, threads=1)
    cfg = ServeConfig(max_tokens_limit=1900, default_max_tokens=8, engine=EngineConfig(max_model_len=2048),
                      api_key_env="", admin_key_env="", mode="show")
    client = openai.OpenAI(api_key="unused", base_url="http://testserver/v1", max_retries=0,
                           http_client=TestClient(create_api(cfg, LocalClient(forced))))
    before = forced.info()["steps"]
    answer = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=1900, stop=["UNSAFE"],
                                            stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream \
        else answer.choices[0].message.content
    assert "UNSAFE" not in text
    deadline = time.perf_counter() + 5
    while forced.info()["active"] and time.perf_counter() < deadline:
        time.sleep(0.01)
    steps = forced.info()["steps"] - before
    assert forced.info()["active"] == 0 and steps < 100, steps  # ended at the stop, not run to 1,900


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"50256": -100}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("response_format", {"type": "json_object"}), ("tool_choice", "required"), ("audio", {"voice": "alloy"}),
])
def test_a_field_the_server_cannot_honour_is_a_400_naming_it(client, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, **{field: value})
    assert err.value.status_code == 400 and err.value.body["param"] == field
    assert field in err.value.body["message"]


def test_fields_sent_with_values_that_ask_for_nothing_are_accepted(client):
    r = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, logprobs=False,
                                       presence_penalty=0, frequency_penalty=0.0, tools=[], tool_choice="none",
                                       response_format={"type": "text"}, user="u1", metadata={"k": "v"}, store=False)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_row_penalties_by_hand():
    """Two rows, prompts of 2 tokens; the penalties count only the answer's tokens."""
    import torch

    from r2d.serve.transformers_backend import row_penalties

    ids = torch.tensor([[1, 2, 5, 5, 7], [3, 3, 0, 4, 4]])
    out = row_penalties([0.5, 0.0], [0.25, 1.0], prompt_len=2)(ids, torch.zeros(2, 10))
    expected = torch.zeros(2, 10)
    expected[0, 5] = -(0.5 + 2 * 0.25)  # twice in the answer: presence once, frequency twice
    expected[0, 7] = -(0.5 + 0.25)
    expected[1, 0] = -1.0
    expected[1, 4] = -2.0  # token 3 is only in the prompt: untouched
    assert torch.equal(out, expected)


def _greedy_with_penalties(engine, messages, max_tokens, presence, frequency) -> str:
    """The reference: a plain greedy loop over the model, OpenAI's penalties subtracted by hand."""
    import torch

    from r2d.pivots import render_conversation

    cur = engine._current
    tok, model = cur.tokenizer, cur.model
    ids = tok(render_conversation(tok, messages), add_special_tokens=False)["input_ids"]
    made: list[int] = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + made])).logits[0, -1].clone()
            for t in set(made):
                logits[t] -= presence + frequency * made.count(t)
            nxt = int(logits.argmax())
            if nxt in cur.eos_ids:
                break
            made.append(nxt)
    return tok.decode(made, skip_special_tokens=False)


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_follow_openais_definition_through_the_official_client(client, engine, stream):
    kwargs = {"model": "r2d", "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    answer = client.chat.completions.create(**kwargs, presence_penalty=1.5, frequency_penalty=2.0, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream \
        else answer.choices[0].message.content
    expected = _greedy_with_penalties(engine, MESSAGES, 24, 1.5, 2.0)
    assert text == expected
    assert expected != plain  # the penalties change this answer: a server ignoring them would fail


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_out_of_range_are_refused_with_the_field(client, field):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, **{field: 2.5})
    assert err.value.body["param"] == field


def test_the_engines_refuse_penalties_out_of_range_themselves():
    from r2d.serve.schemas import GenRequest

    assert GenRequest(MESSAGES, 4, presence_penalty=-2.0, frequency_penalty=2.0).sampling_error() is None
    assert GenRequest(MESSAGES, 4, frequency_penalty=float("nan")).sampling_error().startswith("frequency_penalty")
    assert GenRequest(MESSAGES, 4, presence_penalty=-2.01).sampling_error().startswith("presence_penalty")


def test_the_vllm_request_carries_the_sampling_fields_and_the_token_ids():
    from r2d.serve.schemas import GenRequest
    from r2d.serve.vllm_backend import completion_request

    req = GenRequest(MESSAGES, 7, temperature=0.5, top_p=0.9, seed=3, presence_penalty=0.5, frequency_penalty=-1.0)
    out = completion_request(req, [5, 6, 7], "r2d")
    assert (out.prompt, out.model, out.max_tokens, out.temperature, out.top_p, out.seed) == \
        ([5, 6, 7], "r2d", 7, 0.5, 0.9, 3)
    assert (out.presence_penalty, out.frequency_penalty, out.skip_special_tokens) == (0.5, -1.0, False)
    params = out.to_sampling_params(max_tokens=7, default_sampling_params={})  # what vLLM samples with
    assert (params.presence_penalty, params.frequency_penalty, params.seed, params.skip_special_tokens) == \
        (0.5, -1.0, 3, False)
    assert out.stream and out.stream_options.continuous_usage_stats  # every chunk counts its tokens


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], ["x" * 65]])
def test_bad_stop_lists_are_refused_with_the_field(client, stop):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, stop=stop)
    assert err.value.body["param"].startswith("stop")


SAMPLED = {"model": "r2d", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7}


def test_n_choices_are_n_engine_requests_seeded_one_after_another():
    """Choice i runs with seed + i (wrapping below 2**63), so n choices are reproducible and not n copies."""
    from r2d.serve.schemas import SEED_MAX, ChatCompletionRequest

    api = create_api(ServeConfig(default_max_tokens=8, api_key_env="", admin_key_env=""), client=None).state.r2d
    gens = api._gen_requests(ChatCompletionRequest.model_validate({"messages": MESSAGES, "n": 3, "seed": 7}))
    assert [g.seed for g in gens] == [7, 8, 9] and len({g.request_id for g in gens}) == 3
    gens = api._gen_requests(ChatCompletionRequest.model_validate({"messages": MESSAGES, "n": 2, "seed": SEED_MAX}))
    assert [g.seed for g in gens] == [SEED_MAX, 0]
    unseeded = api._gen_requests(ChatCompletionRequest.model_validate({"messages": MESSAGES, "n": 2}))
    assert [g.seed for g in unseeded] == [None, None]


def test_n_choices_through_the_official_client(client):
    many = client.chat.completions.create(**SAMPLED, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1, "the choices are copies of one answer"
    assert all(c.finish_reason in ("stop", "length") for c in many.choices)
    ran_out = sum(c.finish_reason == "length" for c in many.choices)
    assert many.usage.completion_tokens >= 12 * ran_out and many.usage.completion_tokens <= 36
    if ran_out == 3:  # the tiny model rarely stops: then every choice's 12 tokens are counted
        assert many.usage.completion_tokens == 36


def test_n_choices_stream_interleaved_each_with_its_index_and_one_finish(client):
    chunks = list(client.chat.completions.create(**SAMPLED, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts[0] and texts[1] and texts[0] != texts[1]
    assert all(len(f) == 1 for f in finishes.values()), finishes
    ran_out = sum(f == ["length"] for f in finishes.values())
    assert chunks[-1].usage.completion_tokens >= 12 * ran_out


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_refused_with_the_field(client, n):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, n=n)
    assert err.value.body["param"] == "n"


def test_interleave_yields_as_each_produces_raises_the_first_error_and_closes_every_stream():
    from r2d.serve.transport import interleave

    closed: list[str] = []

    def source(name: str, n: int, fail: bool = False):
        async def gen():
            try:
                for i in range(n):
                    await asyncio.sleep(0.01)
                    yield f"{name}{i}"
                if fail:
                    raise RuntimeError(f"{name} failed")
            finally:
                closed.append(name)
        return gen()

    async def collect(streams, stop_after=None):
        """What came out, and which streams were closed as soon as interleave was (not at loop shutdown)."""
        out = []
        try:
            async with contextlib.aclosing(interleave(streams)) as items:
                async for item in items:
                    out.append(item)
                    if stop_after and len(out) == stop_after:
                        break
        except RuntimeError as err:
            return out, sorted(closed), str(err)
        return out, sorted(closed), None

    out, shut, error = asyncio.run(collect([source("a", 3), source("b", 2)]))
    assert sorted(out) == ["a0", "a1", "a2", "b0", "b1"] and out.index("b0") < out.index("a2")  # not one after the other
    assert shut == ["a", "b"] and error is None
    closed.clear()
    _, shut, error = asyncio.run(collect([source("a", 100), source("b", 1, fail=True)]))
    assert error == "b failed" and shut == ["a", "b"]
    closed.clear()
    assert asyncio.run(collect([source("a", 100)], stop_after=2)) == (["a0", "a1"], ["a"], None)


# ---------------------------------------------------------------- logprobs


def _reference_logprobs(engine, k: int, max_tokens: int):
    """Greedy generation by transformers itself, with the raw logits: [(token id, logprob, top k ids, top k)]."""
    import torch

    from r2d.pivots import render_conversation

    cur = engine._current
    ids = cur.tokenizer(render_conversation(cur.tokenizer, MESSAGES), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = cur.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=cur.tokenizer.pad_token_id)
    made = out.sequences[0, ids["input_ids"].shape[1]:].tolist()
    steps = []
    for token, logits in zip(made, out.logits):
        lp = torch.log_softmax(logits[0].float(), -1)
        top = lp.topk(k)
        steps.append((token, float(lp[token]), top.indices.tolist(), top.values.tolist()))
    return steps


def test_logprobs_are_the_models_own_through_the_official_client(client, engine):
    """Each token's log-probability and its 3 most likely alternatives equal those of transformers' own
    greedy generation on the same prompt (raw logits), plain and streamed."""
    ref = _reference_logprobs(engine, 3, 8)
    r = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    tok = engine._current.tokenizer
    assert len(content) == r.usage.completion_tokens == len(ref)
    for entry, (token, lp, top_ids, top_lps) in zip(content, ref):
        assert entry.token == tok.decode([token]) and entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in top_ids]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top_lps, abs=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy took the most likely
    assert "".join(e.token for e in content) == r.choices[0].message.content

    chunks = list(client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked for: none sent
    no_top = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=8, logprobs=True)
    assert [e.logprob for e in no_top.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def test_logprobs_stop_with_the_text_at_a_stop_string(client):
    full = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=24, temperature=0, logprobs=True)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for stream in (False, True):
        got = client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=24, temperature=0,
                                             logprobs=True, stop=[stop], stream=stream)
        if stream:
            chunks = list(got)
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        else:
            answer, entries = got.choices[0].message.content, got.choices[0].logprobs.content
        assert answer == text[:text.find(stop)]
        tokens = "".join(e.token for e in entries)  # the tokens that wrote the answer, none of the stop's own
        assert answer.startswith(tokens) or tokens.startswith(answer), (answer, tokens)
        assert len(tokens) < len(answer) + len(stop) and len(entries) < len(full.choices[0].logprobs.content)


def test_logprobs_mapped_through_a_stop_cut():
    def entry(text):
        return {"token": text, "logprob": -0.5, "bytes": list(text.encode()), "top_logprobs": []}

    async def source():
        yield Delta("The an", None, 3, 2, logprobs=[entry("The"), entry(" an")])
        yield Delta("swer: ST", None, 3, 4, logprobs=[entry("swer:"), entry(" ST")])
        yield Delta("OP and", "length", 3, 6, logprobs=[entry("OP"), entry(" and")])

    async def collect():
        return [d async for d in until_stop(source(), ["STOP"])]

    out = asyncio.run(collect())
    assert [d.text for d in out] == ["The", " answer:", " "]
    # " an" starts at 3, inside held-back text: it travels with the text it starts. " ST" writes the answer's
    # last character, so it is kept; "OP" and " and" (the stop's and after it) are not.
    assert [[e["token"] for e in d.logprobs] for d in out] == [["The"], [" an", "swer:"], [" ST"]]


def test_logprobs_are_refused_where_they_would_reveal_hidden_reasoning(engine):
    hidden = _openai_client(engine, "hide")
    with pytest.raises(openai.BadRequestError) as err:
        hidden.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, logprobs=True)
    assert err.value.body["param"] == "logprobs" and "reveal the hidden reasoning" in err.value.body["message"]
    r = hidden.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, logprobs=False)
    assert r.choices[0].logprobs is None


def test_top_logprobs_needs_logprobs_and_stays_in_bounds(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, top_logprobs=2)
    assert err.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="r2d", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=21)
    assert err.value.body["param"] == "top_logprobs"
