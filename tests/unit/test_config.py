"""Config loading: every shipped YAML loads, overrides apply, and bad configs name the field."""

from pathlib import Path

import pytest

from r2d.config import Config, ConfigError, field_docs, help_text, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
# rehearse.yaml is an override laid over the GPU recipe, never a config of its own (test_rehearsal_config.py).
SHIPPED = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if p.name != "rehearse.yaml")


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"tiny.yaml", "qwen2.5-7b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.lora.r >= 1


def test_gpu_recipe_has_paper_settings():
    cfg = load_config(ROOT / "jobs/configs/qwen2.5-7b.yaml")
    assert cfg.distill.teacher.source == "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"
    assert cfg.distill.engine.kind == "vllm" and cfg.distill.engine.tensor_parallel_size == 8
    assert cfg.distill.tagger == "guard" and "Llama-Guard-3" in cfg.distill.guard.source
    assert (cfg.distill.sampling.temperature, cfg.distill.sampling.repetition_penalty) == (0.6, 1.0)
    assert (cfg.train.lora.r, cfg.train.lora.alpha) == (64, 64)
    assert cfg.train.learning_rate == 2e-4 and cfg.train.scheduler == "cosine"
    assert cfg.resources.use_gpu and cfg.model.dtype == "bfloat16"
    assert cfg.resources.train_workers * cfg.train.batch_size * cfg.train.grad_accum == 32


def test_overrides_keep_types():
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml",
                      ["train.max_steps=7", "train.lora.target_modules=[q_proj,v_proj]", "serve.mode=guard",
                       "train.learning_rate=1e-3", "train.cpo_weight=0"])
    assert cfg.train.max_steps == 7
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.serve.mode == "guard"
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.cpo_weight == 0.0 and isinstance(cfg.train.cpo_weight, float)


def test_a_partial_mapping_keeps_the_fields_own_defaults():
    """Setting one key of a nested section keeps that section's own defaults for the rest, not the
    plain dataclass's: the guard stays Llama Guard, the judge model stays unset, the teacher's sampling
    keeps its repetition penalty. Keys named are still checked."""
    default = load_config(None)
    assert default.distill.guard.source == "meta-llama/Llama-Guard-3-8B" and default.eval.judge_model.source == ""
    cfg = load_config(None, ["distill.guard.dtype=bfloat16", "eval.judge_model.dtype=bfloat16",
                             "distill.sampling.max_tokens=64"])
    assert (cfg.distill.guard.source, cfg.distill.guard.dtype) == ("meta-llama/Llama-Guard-3-8B", "bfloat16")
    assert (cfg.eval.judge_model.source, cfg.eval.judge_model.dtype) == ("", "bfloat16")
    assert (cfg.distill.sampling.max_tokens, cfg.distill.sampling.repetition_penalty) == (64, 1.2)
    assert load_config(None, ["distill={sampling: {top_p: 0.5}}"]).distill.guard.source == default.distill.guard.source
    with pytest.raises(ConfigError, match="distill.guard.bogus: unknown key"):
        load_config(None, ["distill.guard.bogus=1"])


def test_a_config_error_inside_an_entry_point_is_one_line_and_status_2(capsys):
    from r2d.config import exit_on_config_error

    with pytest.raises(SystemExit) as stop, exit_on_config_error("distill"):
        raise ConfigError("distill.output_dir: x holds traces made with other settings")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "distill: error: distill.output_dir: x holds traces made with other settings\n"
    with exit_on_config_error("distill"):  # nothing raised: nothing printed, no exit
        pass
    with pytest.raises(ValueError), exit_on_config_error("distill"):  # other errors pass through
        raise ValueError("not a config error")


@pytest.mark.parametrize("override, fragments", [
    # unknown key
    ("train.bogus=1", ["train.bogus", "unknown key"]),
    # wrong type
    ("serve.port=abc", ["serve.port", "'abc'", "an integer"]),
    # out of range
    ("train.lora.r=0", ["train.lora.r", "0", ">= 1"]),
    # not one of the choices
    ("eval.judge=llm", ["eval.judge", "'llm'", "'refusal'"]),
    # boolean where a number is expected
    ("train.epochs=true", ["train.epochs", "True", "a number"]),
    # cross-field check
    ("serve.min_replicas=3", ["serve.min_replicas", "3", "max_replicas"]),
    # list item field
    ("data.sources=[{name: file}]", ["data.sources[0].path", "non-empty path"]),
    # mapping expected
    ("train.lora=5", ["train.lora", "5", "a mapping"]),
    # fraction out of range
    ("data.eval_fraction=1.5", ["data.eval_fraction", "1.5", "[0, 1)"]),
])
def test_bad_config_names_field_value_and_expectation(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "jobs/configs/tiny.yaml", [override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(scalar)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.max_steps")
    with pytest.raises(ConfigError, match="workdir: got .*expected a string"):
        load_config(None, ["workdir.x=1"])
    with pytest.raises(ConfigError, match="cannot set a key below 'max_steps'"):
        load_config(None, ["train.max_steps=1", "train.max_steps.x=2"])


def test_every_field_has_a_docstring():
    docs = field_docs()
    missing = [name for name, doc in docs.items() if not doc.strip()]
    assert not missing, missing
    assert "train.cpo_weight" in help_text()


def test_digest_changes_with_config():
    a = load_config(ROOT / "jobs/configs/tiny.yaml")
    b = load_config(ROOT / "jobs/configs/tiny.yaml", ["train.cpo_weight=0.5"])
    assert a.digest() == load_config(ROOT / "jobs/configs/tiny.yaml").digest()
    assert a.digest() != b.digest()
