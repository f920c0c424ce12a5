"""KubeRay manifests under deploy/: they parse, name real jobs and configs, and ask for the recipe's GPUs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from r2d.config import load_config
from r2d.placement import engine_gpus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _groups(cluster_spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def _container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def _gpus(group: dict) -> int:
    limits = _container(group)["resources"]["limits"]
    requests = _container(group)["resources"]["requests"]
    assert limits.get("nvidia.com/gpu", 0) == requests.get("nvidia.com/gpu", 0), "GPU request != limit"
    return int(limits.get("nvidia.com/gpu", 0))


def _entry_paths(entrypoint: str) -> tuple[Path, Path]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python"
    return ROOT / argv[1], ROOT / argv[argv.index("--config") + 1]


def test_there_are_two_jobs_and_a_service():
    kinds = sorted(_load(p.name)["kind"] for p in MANIFESTS)
    assert kinds == ["RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_basics(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in ("RayJob", "RayService")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "work belongs on workers, not the head"
    envs = {e["name"] for e in _container(head)["env"]}
    assert "MLFLOW_TRACKING_URI" in envs
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert {e["name"] for e in _container(group)["env"]} == envs, "head and workers must share env"


@pytest.mark.parametrize("name, job", [("rayjob-distill.yaml", "distill.py"), ("rayjob-train.yaml", "train_cpo.py")])
def test_job_entrypoints_reference_shipped_files(name, job):
    doc = _load(name)
    script, config = _entry_paths(doc["spec"]["entrypoint"])
    assert script.name == job
    assert config.is_file(), f"{config} missing"
    load_config(config)
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert ".venv" in runtime_env["excludes"]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_job_scripts_exist():
    for name in ("rayjob-distill.yaml", "rayjob-train.yaml"):
        script, _ = _entry_paths(_load(name)["spec"]["entrypoint"])
        assert script.is_file(), f"{script.relative_to(ROOT)} is missing"
        assert 'if __name__ == "__main__":' in script.read_text()


def test_distill_gpu_limits_match_the_recipe():
    doc = _load("rayjob-distill.yaml")
    _, config = _entry_paths(doc["spec"]["entrypoint"])
    cfg = load_config(config)
    groups = _groups(doc["spec"]["rayClusterSpec"])
    assert _gpus(groups["gpu-teacher"]) >= engine_gpus(cfg.distill.engine) == 8
    assert _gpus(groups["gpu-guard"]) >= engine_gpus(cfg.distill.guard_engine) == 1
    assert groups["gpu-teacher"]["maxReplicas"] >= cfg.distill.engine.concurrency


def test_train_gpu_limits_match_the_recipe():
    doc = _load("rayjob-train.yaml")
    _, config = _entry_paths(doc["spec"]["entrypoint"])
    res = load_config(config).resources
    group = _groups(doc["spec"]["rayClusterSpec"])["gpu-train"]
    per_pod = _gpus(group)
    workers_per_pod = per_pod // res.gpus_per_worker
    cpus = float(_container(group)["resources"]["limits"]["cpu"])
    assert cpus >= workers_per_pod * res.cpus_per_worker
    assert group["maxReplicas"] * workers_per_pod >= res.train_workers == 8
    assert doc["spec"]["backoffLimit"] >= 1


def test_service_serves_the_recipe_with_matching_replicas():
    doc = _load("rayservice-serve.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    cfg = load_config(ROOT / app["args"]["config"])
    module, _, attr = app["import_path"].partition(":")
    assert attr, "import_path is module:attribute"
    group = _groups(doc["spec"]["rayClusterSpec"])["gpu-serve"]
    assert _gpus(group) >= cfg.serve.engine.num_gpus == 1
    assert group["maxReplicas"] >= cfg.serve.max_replicas
    assert group["minReplicas"] >= cfg.serve.min_replicas
    source = ROOT / "platform" / (module.replace(".", "/") + ".py")
    assert f"def {attr}(args" in source.read_text(), f"{app['import_path']} is not a Serve application builder"


def test_service_binds_publicly_only_with_keys_read_from_a_mounted_secret():
    """The RayService listens on 0.0.0.0: the ingress needs the API key, read from files on every pod, never env."""
    from pathlib import PurePosixPath

    from r2d.serve.auth import preflight

    doc = _load("rayservice-serve.yaml")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    args = dict(app["args"])
    cfg = load_config(ROOT / args.pop("config"), [f"{k}={v}" for k, v in args.items()])
    assert cfg.serve.host == serve_cfg["http_options"]["host"] == "0.0.0.0"
    preflight(cfg.serve)  # refused without a key; the key file is set
    spec = doc["spec"]["rayClusterSpec"]
    for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
        mounts = {m["mountPath"]: m["name"] for m in _container(group).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        secret = volumes[mounts[str(PurePosixPath(cfg.serve.api_key_file).parent)]]["secret"]
        assert secret["secretName"] == "r2d-secrets"
        assert {i["path"] for i in secret["items"]} >= {PurePosixPath(cfg.serve.api_key_file).name,
                                                       PurePosixPath(cfg.serve.admin_key_file).name}
        assert not any("KEY" in e["name"] for e in _container(group)["env"]), "keys travel as files, not env"
