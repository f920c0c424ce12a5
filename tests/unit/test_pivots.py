"""The one render/parse path: round trips through real tokenizers, pivot ids by string, resizing."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r2d.pivots import (PIVOTS, RETHINK, SAFE, THINK_CLOSE, THINK_OPEN, UNSAFE, PivotVocabularyError, Trace,
                        add_pivot_tokens, count_pivots, decode_completion, parse_trace, pivot_ids, render_assistant,
                        render_conversation, render_prefix_and_full, resize_for_pivots, split_reasoning)


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


_TEXT = st.text(alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()-/éüß→")),
                min_size=1, max_size=60).map(str.strip).filter(
    lambda s: s and not any(tok in s for tok in (*PIVOTS, THINK_OPEN, THINK_CLOSE)))
_TRACES = st.builds(
    lambda steps_pivots, answer, answer_pivot: Trace([s for s, _ in steps_pivots], [p for _, p in steps_pivots],
                                                     answer, answer_pivot),
    st.lists(st.tuples(_TEXT, st.sampled_from(PIVOTS)), min_size=1, max_size=6), _TEXT, st.sampled_from(PIVOTS))


def _roundtrip(tokenizer, trace):
    prefix, full = render_prefix_and_full(tokenizer, "How do I kill a stuck process?", trace)
    ids = tokenizer(full, add_special_tokens=False).input_ids
    n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids)
    completion = decode_completion(tokenizer, ids[n_prefix:])
    return parse_trace(completion)


@pytest.mark.parametrize("tokenizer_fixture", ["smol_tokenizer", "think_tokenizer_with_think"])
def test_roundtrip(request, tokenizer_fixture):
    """render → tokenize → decode → parse gives the trace back, with and without a native <think>."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)

    @settings(max_examples=45, deadline=None)
    @given(trace=_TRACES)
    def check(trace):
        parsed = _roundtrip(tokenizer, trace)
        assert parsed.ok, parsed.errors
        assert parsed.trace == trace

    check()


@pytest.fixture(scope="module")
def think_tokenizer_with_think(tiny_model_dir):
    """Start from the base SmolLM2 tokenizer, give it <think> first (as Qwen/R1 tokenizers have), then pivots."""
    from transformers import AutoTokenizer

    from r2d.models import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("bundled:smollm2-135m"))
    assert THINK_OPEN not in tok.get_vocab()
    tok.add_tokens([THINK_OPEN, THINK_CLOSE], special_tokens=True)
    think_id = tok.convert_tokens_to_ids(THINK_OPEN)
    added = add_pivot_tokens(tok)
    assert added == list(PIVOTS), "only the pivots are added when <think> exists"
    assert pivot_ids(tok).think_open == think_id
    return tok


def test_pivot_ids_by_string_not_position(smol_tokenizer):
    ids = pivot_ids(smol_tokenizer)
    for token, token_id in ids.by_token().items():
        assert smol_tokenizer.convert_ids_to_tokens(token_id) == token
        assert smol_tokenizer.encode(token, add_special_tokens=False) == [token_id]
    # A tokenizer whose pivots sit elsewhere still resolves them by string.
    tok = copy.deepcopy(smol_tokenizer)
    tok.add_tokens(["<extra>"])
    assert pivot_ids(tok) == ids


def test_pivot_ids_missing_raises(tiny_model_dir):
    from transformers import AutoTokenizer

    from r2d.models import resolve_source

    base = AutoTokenizer.from_pretrained(resolve_source("bundled:smollm2-135m"))
    with pytest.raises(PivotVocabularyError, match=r"\[SAFE\]"):
        pivot_ids(base)


def test_add_pivot_tokens_is_idempotent(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    n = len(tok)
    assert add_pivot_tokens(tok) == []
    assert len(tok) == n


def test_pivots_survive_decoding_with_skip_special(smol_tokenizer):
    text = render_assistant(Trace(["Check the request."], [UNSAFE], "I can't help.", UNSAFE))
    ids = smol_tokenizer(text, add_special_tokens=False).input_ids
    assert smol_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_resize_pads_to_64_and_initialises_mean():
    from transformers import LlamaConfig, LlamaForCausalLM

    from r2d.models import resolve_source
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_source("bundled:smollm2-135m"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=False))
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    add_pivot_tokens(tok)
    size = resize_for_pivots(model, tok)
    assert size % 64 == 0 and size >= len(tok)
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    n_old = old_emb.shape[0]
    torch.testing.assert_close(emb[:n_old], old_emb)
    torch.testing.assert_close(head[:n_old], old_head)
    for row in pivot_ids(tok).by_token().values():
        torch.testing.assert_close(emb[row], old_emb.mean(0))
        torch.testing.assert_close(head[row], old_head.mean(0))
    assert resize_for_pivots(model, tok) == size  # already big enough: untouched


def test_render_conversation_uses_chat_template(smol_tokenizer):
    trace = Trace(["Step."], [SAFE], "Answer.", SAFE)
    prefix, full = render_prefix_and_full(smol_tokenizer, "Hi", trace, system="Be safe.")
    assert prefix.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\nBe safe.<|im_end|>" in full
    assert full.startswith(prefix) and render_assistant(trace) in full
    messages = [{"role": "user", "content": "Hi"}]
    assert render_conversation(smol_tokenizer, messages) == render_conversation(smol_tokenizer, "Hi")


def test_parse_handles_malformed_text():
    unclosed = parse_trace("<think>\nI am thinking [SAFE]\nstill going")
    assert not unclosed.closed and "no </think>" in unclosed.errors
    assert unclosed.trace.steps == ["I am thinking", "still going"]
    assert unclosed.trace.pivots == [SAFE, RETHINK]
    bare = parse_trace("Sure, here is a poem.")
    assert "no <think>" in bare.errors
    no_pivot = parse_trace("<think>\nfine\n</think>\n\nAnswer")
    assert {"step without pivot", "answer without pivot"} <= set(no_pivot.errors)
    r1_style = parse_trace("I consider it [SAFE]\n</think>\n\nFine [SAFE]")  # template opened <think>
    assert r1_style.ok and r1_style.trace.steps == ["I consider it"]
    ended = parse_trace("<think>\nok [SAFE]\n</think>\n\nDone [SAFE]<|im_end|>\ngarbage [UNSAFE]")
    assert ended.ok and ended.trace.answer_pivot == SAFE and ended.trace.answer == "Done"


def test_split_reasoning_and_counts():
    text = "<think>\nThis is harmful [UNSAFE]\nRefuse [SAFE]\n</think>\n\nI can't help with that. [UNSAFE]"
    reasoning, answer = split_reasoning(text)
    assert reasoning == "This is harmful\nRefuse"
    assert answer == "I can't help with that."
    assert count_pivots(text) == {SAFE: 1, UNSAFE: 2, RETHINK: 0}
    assert split_reasoning("<think>\nnever closed [SAFE]") == ("never closed", "")


@pytest.mark.parametrize("text, answer", [
    # the reasoning closed again after the answer: the answer goes on, the tag goes
    ("<think>a [SAFE]</think>\n\nA ghost gun is a gun. [SAFE]\n</think> It acts. [SAFE]",
     "A ghost gun is a gun.\nIt acts."),
    ("<think>a</think>one</think>two", "one two"),
    # reasoning re-opened after the answer: dropped where it closes, cut where it never does
    ("<think>a</think>Answer. <think>b [UNSAFE]</think> More.", "Answer. More."),
    ("<think>a</think>Answer. [SAFE]\n<think>more, never closed", "Answer."),
    # a code block's indentation is the answer's own
    ("<think>a</think>\n```\n    x = 1\n```", "```\n    x = 1\n```"),
])
def test_no_think_tag_reaches_the_visible_answer(text, answer):
    assert split_reasoning(text) == ("a", answer)


def test_trace_validation():
    with pytest.raises(ValueError, match="2 steps but 1 pivots"):
        Trace(["a", "b"], [SAFE], "x")
    with pytest.raises(ValueError, match="unknown pivot"):
        Trace(["a"], ["[MAYBE]"], "x")
