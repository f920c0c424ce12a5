"""rehearse.yaml may change only model ids, accelerator counts, sizes, the engines' device and endpoints.

The rehearsal runs the GPU recipe unchanged with rehearse.yaml laid over it; these tests keep
that override from drifting into a different recipe: every key it sets is on the list below,
and the resolved config differs from the recipe's in those keys only.
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest
from r2d.config import flatten, load_config
from r2d.config.loading import merge, read_yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "jobs" / "configs" / "qwen2.5-7b.yaml"
REHEARSE = ROOT / "jobs" / "configs" / "rehearse.yaml"

ALLOWED = {
    "model ids (tiny local stand-ins)": ["model.source", "distill.teacher.source", "distill.guard.source",
                                         "serve.model"],
    "accelerator counts (GPUs -> CPUs) and the engines' device": [
        "*.dtype", "*engine.num_gpus", "*engine.num_cpus", "*engine.tensor_parallel_size", "resources.use_gpu",
        "resources.gpus_per_worker", "resources.cpus_per_worker", "resources.train_workers"],
    "sizes (prompts, steps, tokens)": [
        "*engine.batch_size", "*engine.max_model_len", "*engine.max_num_seqs", "*engine.kv_cache_gb",
        "*sampling.max_tokens",
        "distill.max_prompts", "distill.chunk_size", "train.batch_size", "train.max_steps", "train.checkpoint_every",
        "eval.max_per_suite", "serve.max_replicas", "serve.max_tokens_limit", "serve.default_max_tokens",
        "data.sources.*.limit"],
    "where the data and the endpoints are": ["data.sources.*.path", "serve.port"],
}
PATTERNS = [p for group in ALLOWED.values() for p in group]
ENV = {"R2D_REHEARSAL": "/rehearsal", "R2D_SERVE_PORT": "8123"}


def _keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out += _keys(value, dotted + ".") if isinstance(value, dict) else [dotted]
    return out


@pytest.fixture
def env(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


def _resolved(cfg) -> dict:
    """The config as dotted keys, list items indexed (data.sources.0.path)."""
    tree = cfg.to_dict()
    sources = tree["data"].pop("sources")
    out = flatten(tree)
    out.update({f"data.sources.{i}.{k}": v for i, s in enumerate(sources) for k, v in s.items()})
    return out


def test_rehearse_sets_only_allowed_keys(env):
    tree = read_yaml(REHEARSE)
    stray = [k for k in _keys(tree) if not any(fnmatch(k, p) for p in PATTERNS)]
    assert not stray, f"rehearse.yaml sets keys outside the allowed list: {stray}"


def test_resolved_rehearsal_differs_from_the_recipe_only_in_allowed_keys(env):
    recipe = _resolved(load_config(RECIPE))
    rehearsed = load_config([RECIPE, REHEARSE])
    changed = sorted(k for k, v in _resolved(rehearsed).items() if recipe[k] != v)
    stray = [k for k in changed if not any(fnmatch(k, p) for p in PATTERNS)]
    assert not stray, f"the rehearsal changes the recipe outside the allowed list: {stray}"
    assert "data.sources.0.path" in changed and "data.sources.0.column" not in changed
    # What the rehearsal must keep: the storage the recipe names, its engines, tagger, training recipe, gates.
    assert rehearsed.distill.output_dir == "s3://r2d-artifacts/traces/qwen2.5-7b"
    assert rehearsed.train.storage_path.startswith("s3://r2d-artifacts/")
    assert rehearsed.eval.output_dir.startswith("s3://r2d-artifacts/")
    assert (rehearsed.distill.engine.kind, rehearsed.distill.guard_engine.kind, rehearsed.eval.engine.kind,
            rehearsed.serve.engine.kind) == ("vllm",) * 4
    assert rehearsed.distill.tagger == "guard" and rehearsed.data.sources[0].column == "instruction"
    assert rehearsed.train.lora == load_config(RECIPE).train.lora and rehearsed.gates == load_config(RECIPE).gates


def test_the_list_catches_a_drift(env):
    """The check is not a rubber stamp: an override of the learning rate or the tagger is caught."""
    tree = merge(read_yaml(REHEARSE), {"distill": {"tagger": "rules"}, "train": {"learning_rate": 1.0}})
    stray = [k for k in _keys(tree) if not any(fnmatch(k, p) for p in PATTERNS)]
    assert sorted(stray) == ["distill.tagger", "train.learning_rate"]


def test_the_override_needs_its_environment(monkeypatch):
    from r2d.config import ConfigError

    monkeypatch.delenv("R2D_REHEARSAL", raising=False)
    with pytest.raises(ConfigError, match="environment variable R2D_REHEARSAL is not set"):
        load_config([RECIPE, REHEARSE])


def test_overlays_merge_mappings_and_list_items(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text("data: {sources: [{name: benign, limit: 3}, {name: harmbench, split: val}]}\n"
                    "train: {max_steps: 5, batch_size: 2}\n")
    over = tmp_path / "over.yaml"
    over.write_text("data: {sources: {1: {limit: 4}}}\ntrain: {max_steps: 7}\n")
    cfg = load_config([base, over], ["data.sources.0.limit=9"])
    assert [(s.name, s.limit, s.split) for s in cfg.data.sources] == [("benign", 9, ""), ("harmbench", 4, "val")]
    assert (cfg.train.max_steps, cfg.train.batch_size) == (7, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {sources: {5: {limit: 1}}}\n")
    from r2d.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources.5: not an index of the 2 items"):
        load_config([base, bad])
    with pytest.raises(ConfigError, match=r"data.sources.3.limit: '3' is not an index of the 2 items"):
        load_config([base], ["data.sources.3.limit=1"])
