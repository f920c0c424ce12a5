"""Scale and security settings flow from the config into the Serve deployment options."""

from __future__ import annotations

import pytest

from r2d.config import ConfigError, ServeConfig, load_config
from r2d.serve.app import _ingress_options


def test_keys_never_travel_in_a_ray_runtime_env(monkeypatch, tmp_path):
    """Ray shows runtime envs in its dashboard and job listings: the replica reads its keys itself."""
    import pickle

    monkeypatch.setenv("R2D_API_KEY", "api-secret-0451")
    monkeypatch.setenv("R2D_ADMIN_KEY", "admin-secret-0451")
    (tmp_path / "key").write_text("file-secret-0451")
    cfg = ServeConfig(api_key_file=str(tmp_path / "key"))
    options = _ingress_options(cfg)
    assert "runtime_env" not in options["ray_actor_options"]
    # Nothing Ray receives for the ingress (its options and its init arguments) holds a key.
    shipped = pickle.dumps((options, cfg))
    assert b"secret-0451" not in shipped


@pytest.mark.parametrize("override, field", [
    ("serve.allowed_modes=[hide, loud]", "allowed_modes"),
    ("serve.reload_poll_s=-1", "reload_poll_s"),
    ("serve.engine.max_model_len=512", "engine.max_model_len"),  # not above max_tokens_limit (1024)
    ("serve.engine.kind=openai", "engine"),
    ("serve.request_timeout_s=0", "request_timeout_s"),
    ("serve.reload_backoff_s=0", "reload_backoff_s"),
    ("serve.host=", "host"),
    ("serve.mode=guard", None),
])
def test_serve_config_checks(override, field):
    if field is None:
        assert load_config(None, [override]).serve.mode == "guard"
        return
    with pytest.raises(ConfigError, match=f"serve.{field}"):
        load_config(None, [override])


def test_the_alias_poller_backs_off_while_reloads_fail(monkeypatch):
    """Every 1 s normally; after failures 30, 60, 120, 240 s (doubling from serve.reload_backoff_s); back to 1 s."""
    import asyncio

    from r2d.serve import replica

    delays = []

    async def sleep(seconds):
        delays.append(seconds)
        if len(delays) == 7:
            raise asyncio.CancelledError

    class Registry:
        calls = 0

        async def reload(self):
            self.calls += 1
            if self.calls <= 4:
                raise RuntimeError("the registry does not answer")
            return {"reloaded": False}

    monkeypatch.setattr(replica.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(replica.poll_reload(Registry(), every_s=1.0, backoff_s=30.0))
    assert delays == [1.0, 30.0, 60.0, 120.0, 240.0, 1.0, 1.0]


def test_the_vllm_deployment_is_ray_serve_llms_with_the_recipes_engine_and_placement():
    """The GPU recipe's serve section, tensor parallel over 4 GPUs: Ray Serve LLM gets it all from the config."""
    from r2d.serve.vllm_backend import llm_config

    cfg = load_config("jobs/configs/qwen2.5-7b.yaml", ["serve.engine.tensor_parallel_size=4", "serve.max_replicas=3"])
    llm = llm_config(cfg)
    assert (llm.model_id, llm.model_loading_config.model_source) == (cfg.serve.served_model_name, cfg.serve.model)
    assert llm.engine_kwargs["tensor_parallel_size"] == 4 and llm.engine_kwargs["dtype"] == cfg.model.dtype
    assert llm.engine_kwargs["max_num_seqs"] == cfg.serve.engine.max_num_seqs
    assert llm.placement_group_config == {"bundles": [{"GPU": 1, "CPU": 1}] * 4, "strategy": "STRICT_PACK"}
    assert llm.accelerator_config.kind == "gpu"
    deployment = llm.deployment_config
    assert deployment["autoscaling_config"]["max_replicas"] == 3 and deployment["ray_actor_options"] == {"num_cpus": 0}
    engine = llm.get_engine_config()  # Ray Serve LLM's own reading of the engine arguments
    assert engine.placement_bundles == [{"GPU": 1, "CPU": 1}] * 4 and engine.placement_strategy == "STRICT_PACK"


def test_the_vllm_deployment_on_cpu_asks_for_no_gpu_and_carries_the_cpu_engine_environment():
    from r2d.serve.vllm_backend import llm_config

    cfg = load_config("jobs/configs/tiny.yaml", ["serve.engine.kind=vllm", "serve.engine.num_cpus=2",
                                                 "serve.engine.kv_cache_gb=1"])
    llm = llm_config(cfg)
    assert llm.accelerator_config.kind == "cpu" and llm.engine_kwargs["enforce_eager"]
    assert llm.placement_group_config["bundles"] == [{"CPU": 2}]
    env = llm.runtime_env["env_vars"]
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["OMP_NUM_THREADS"] == "2"  # not Ray's 1 for this actor
    assert llm.deployment_config["ray_actor_options"] == {"num_cpus": 0}


def test_engine_outputs_become_deltas():
    """What the engine's completions path yields: SSE strings (one or a batch), a whole response, an error."""
    from r2d.serve.vllm_backend import _delta, parse_output

    chunk = ('data: {"choices": [{"index": 0, "text": "[SA", "finish_reason": null}], '
             '"usage": {"prompt_tokens": 5, "completion_tokens": 1}}\n\n')
    last = ('data: {"choices": [{"index": 0, "text": "FE]", "finish_reason": "length"}], '
            '"usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\ndata: [DONE]\n\n')
    payloads = parse_output([chunk, last])
    deltas = [_delta(p, 5, 0) for p in payloads]
    assert [(d.text, d.finish_reason, d.prompt_tokens, d.completion_tokens) for d in deltas] == \
        [("[SA", None, 5, 1), ("FE]", "length", 5, 2)]

    class Whole:
        def model_dump(self):
            return {"choices": [{"text": "all of it", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3}}

    (whole,) = parse_output(Whole())
    assert _delta(whole, 5, 0).text == "all of it" and _delta(whole, 5, 0).completion_tokens == 3
    err = _delta({"error": {"message": "top_p must be in (0, 1]", "param": "top_p", "code": 400}}, 5, 0)
    assert (err.finish_reason, err.error, err.param) == ("error", "top_p must be in (0, 1]", "top_p")
