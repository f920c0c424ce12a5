"""Config → Ray resource requests (r2d.placement), and storage locations."""

from __future__ import annotations

from pathlib import Path

import pytest

from r2d.config import ConfigError, EngineConfig, ModelConfig, ResourcesConfig, ServeConfig, load_config
from r2d.engines.vllm_engine import engine_args, processor_config
from r2d.placement import (
    absolute_storage_path,
    check_shared_storage,
    engine_gpus,
    is_remote,
    join_storage,
    scaling_config_kwargs,
    serve_deployment_options,
    storage_filesystem,
    storage_scheme,
    train_total_resources,
    validate_storage_uri,
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
    assert opts["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
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


# ---------------------------------------------------------------- storage

@pytest.mark.parametrize("uri, scheme", [("/data/ckpt", "local"), (".r2d/ckpt", "local"), ("file:///x", "local"),
                                         ("s3://bucket/ckpt", "s3"), ("gs://bucket/c", "gs"),
                                         ("gcs://bucket/c", "gs")])
def test_storage_schemes(uri, scheme):
    assert storage_scheme(uri) == scheme
    assert validate_storage_uri(uri, "train.storage_path") == uri
    assert is_remote(uri) == (scheme != "local")


@pytest.mark.parametrize("uri, message", [("", "expected a local path"), ("http://host/x", "scheme 'http'"),
                                          ("s3:///no-bucket", "bucket name"), ("hdfs://nn/x", "scheme 'hdfs'")])
def test_bad_storage_names_the_field(uri, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_storage_uri(uri, "distill.output_dir")
    assert str(err.value).startswith("distill.output_dir:")


def test_join_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_storage_path(".r2d/ckpt") == str(tmp_path.resolve() / ".r2d/ckpt")
    assert absolute_storage_path("ckpt", base="/srv") == "/srv/ckpt"
    assert absolute_storage_path("s3://b/ckpt") == "s3://b/ckpt"
    assert join_storage("s3://b/root/", "run", "/ckpt") == "s3://b/root/run/ckpt"
    assert join_storage("s3://b/root?region=us-west-2", "run") == "s3://b/root/run?region=us-west-2"
    assert join_storage("/data", "run", "x") == "/data/run/x"


def test_storage_filesystem_resolves_without_network(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(str(tmp_path / "traces"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "traces")
    fs.create_dir(path)
    assert fs.get_file_info(path).type == pafs.FileType.Directory
    # With an explicit region pyarrow does not ask S3 where the bucket lives.
    fs, path = storage_filesystem("s3://r2d-artifacts/ckpt?region=us-west-2")
    assert isinstance(fs, pafs.S3FileSystem) and path == "r2d-artifacts/ckpt"
    fs, path = storage_filesystem("gs://r2d-artifacts/traces")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "r2d-artifacts/traces"


def test_multi_node_refuses_node_local_storage(monkeypatch):
    monkeypatch.delenv("R2D_SHARED_FS", raising=False)
    assert check_shared_storage("s3://b/ckpt", "train.storage_path", multi_node=True) == "s3://b/ckpt"
    assert check_shared_storage("/x/ckpt", "train.storage_path", multi_node=False) == "/x/ckpt"
    with pytest.raises(ConfigError, match="train.storage_path: .*several nodes"):
        check_shared_storage("/x/ckpt", "train.storage_path", multi_node=True)
    monkeypatch.setenv("R2D_SHARED_FS", "1")
    assert check_shared_storage("/x/ckpt", "train.storage_path", multi_node=True) == "/x/ckpt"
