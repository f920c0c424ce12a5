"""Shared fixtures: one tiny real model, one local Ray session and a private MLflow per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """A test that points MLflow elsewhere (``init_mlflow`` sets both the env and mlflow's global) leaves the
    next test where it found it: later tests read the runs their own jobs wrote."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 random Llama with the SmolLM2 tokenizer and the pivot vocabulary."""
    from r2d.models import make_tiny_llama

    # R2D_TEST_TOKENIZER: another tokenizer source (a folder) where the bundled package is not installed.
    tokenizer = os.environ.get("R2D_TEST_TOKENIZER", "bundled:smollm2-135m")
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    """A private workdir for .r2d/ state (MLflow sqlite, artifacts, checkpoints)."""
    path = tmp_path_factory.mktemp("r2d-state")
    os.environ["R2D_WORKDIR"] = str(path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
    return path


@pytest.fixture(scope="session")
def ray_session(state_dir):
    """One local Ray for the whole run: each start costs several seconds."""
    import ray

    from r2d.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


_HEADER_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _header_tokenizer(out: Path):
    """A byte-level BPE trained here on the benign set, with a Llama-3-style header template.

    Unlike SmolLM2's ChatML it has no default system turn, and the tokenizer (not the
    template) adds the BOS token.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    benign = Path(__file__).resolve().parent.parent / "platform/r2d/data/benign.jsonl"
    texts = [" ".join((r["prompt"], r["reference"])) for r in map(json.loads, benign.read_text().splitlines())]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bpe.token_to_id("<|begin_of_text|>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|pad|>", chat_template=_HEADER_TEMPLATE)
    return tok


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory) -> Path:
    """A second tiny model, built here without downloads: a 2-layer random Qwen2 (attention biases, an untied
    LM head) with its own tokenizer and chat template (:func:`_header_tokenizer`) and the pivot vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r2d.pivots import add_pivot_tokens, resize_for_pivots

    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    tok = _header_tokenizer(out)
    add_pivot_tokens(tok)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    resize_for_pivots(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
