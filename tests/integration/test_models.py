"""Model sources: the bundled GGUF converts once with no network and the cached folder is reused."""

import time

import pytest

from r2d.models import ModelSourceError, load_model, load_tokenizer, resolve_source

pytestmark = pytest.mark.integration


def test_bundled_converts_once_then_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: everything comes from the installed package
    cache = str(tmp_path / "cache")
    start = time.perf_counter()
    first = resolve_source("bundled:smollm2-135m", cache_dir=cache)
    convert_s = time.perf_counter() - start
    marker = tmp_path.joinpath(first, ".r2d-ready")
    assert marker.exists() and tmp_path.joinpath(first, "model.safetensors").exists()
    stamp = marker.stat().st_mtime_ns

    # The second resolution must not load the GGUF again: make that impossible and resolve again.
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("GGUF was converted a second time")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    start = time.perf_counter()
    second = resolve_source("bundled:smollm2-135m", cache_dir=cache)
    assert second == first
    assert marker.stat().st_mtime_ns == stamp
    assert time.perf_counter() - start < max(1.0, convert_s / 10)


def test_bundled_model_loads_with_pivots_and_generates():
    import torch

    from r2d.pivots import pivot_ids, render_conversation

    model, tok = load_model("bundled:smollm2-135m")
    ids = pivot_ids(tok)
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] > ids.think_close
    assert tok.eos_token == "<|im_end|>"
    text = render_conversation(tok, "What is the capital of France?")
    batch = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_missing_and_corrupt_sources_name_the_source(tmp_path):
    with pytest.raises(ModelSourceError, match="missing.gguf: GGUF file does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="folder does not exist"):
        resolve_source(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(str(empty))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    corrupt.joinpath("config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="corrupt"):
        load_tokenizer(str(corrupt))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf file")
    with pytest.raises(ModelSourceError, match="bad.gguf: cannot convert"):
        resolve_source(str(bad_gguf), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ModelSourceError, match="unknown bundled model"):
        resolve_source("bundled:gpt-9")
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache"):
        resolve_source("some-org/some-model-that-is-not-cached")
