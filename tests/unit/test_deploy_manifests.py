"""KubeRay manifests under deploy/: valid for the pinned KubeRay CRDs, and wired to this repository.

The CRD facts live in ``kuberay_crd.py`` (KubeRay v1.7.0). :func:`validate` checks every manifest
against them: unknown property names, missing required ones, enum values, value kinds and lower
bounds at every described path, plus the few rules the operator adds. Planted mistakes show that it
sees what it must. The remaining tests tie the manifests to this repository: real job scripts and
configs, one image built from deploy/Dockerfile, Serve applications that import, and the recipe's GPUs.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kuberay_crd import (  # tests/unit/kuberay_crd.py: the pinned CRD facts
    ANY, API_VERSION, BOOL, CLUSTER_PATH, INT, KINDS, KUBERAY_VERSION, LIST, NAME_MAX, NUM, OBJ, QTY, QTY_MAP,
    SCHEMA, STR, STR_MAP,
)
from r2d.config import load_config
from r2d.placement import engine_gpus

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))

# ---------------------------------------------------------------------------------------------------
# The validator

_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_quantity(v) -> bool:
    return _is_int(v) or (isinstance(v, str) and _QUANTITY.fullmatch(v) is not None)


_KIND_CHECKS = {
    STR: lambda v: isinstance(v, str),
    INT: _is_int,
    NUM: lambda v: _is_int(v) or isinstance(v, float),
    BOOL: lambda v: isinstance(v, bool),
    OBJ: lambda v: isinstance(v, dict),
    LIST: lambda v: isinstance(v, list),
    STR_MAP: lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    QTY: _is_quantity,
    QTY_MAP: lambda v: isinstance(v, dict) and all(_is_quantity(x) for x in v.values()),
    ANY: lambda v: True,
}


def _walk(schema: dict, path: str, where: str, node: dict, problems: list[str]) -> None:
    """Check ``node``, found at schema ``path`` (``where`` names it with list indices), and below."""
    obj = schema[path]
    for name in obj.required:
        if node.get(name) is None:
            problems.append(f"{where}{name}: required property missing")
    for name, value in node.items():
        here = f"{where}{name}"
        kind = obj.props.get(name)
        if kind is None:
            problems.append(f"{here}: unknown property (allowed: {', '.join(sorted(obj.props))})")
            continue
        if value is None:
            problems.append(f"{here}: null; the API server drops it")
            continue
        if not _KIND_CHECKS[kind](value):
            problems.append(f"{here}: expected {kind}, got {type(value).__name__} {value!r}")
            continue
        if kind == ANY:
            problems.append(f"{here}: allowed, but kuberay_crd.py does not describe its value; add it there")
        if name in obj.enums and value not in obj.enums[name]:
            problems.append(f"{here}: {value!r} is not one of {', '.join(obj.enums[name])}")
        if name in obj.minimum and value < obj.minimum[name]:
            problems.append(f"{here}: {value} is below the minimum {obj.minimum[name]}")
        child = f"{path}.{name}".lstrip(".")
        if kind == OBJ:
            if child in schema:
                _walk(schema, child, here + ".", value, problems)
            elif value:
                problems.append(f"{here}: kuberay_crd.py has no facts for this object; add them there")
        elif kind == LIST:
            for i, item in enumerate(value):
                if isinstance(item, dict) and child + "[]" in schema:
                    _walk(schema, child + "[]", f"{here}[{i}].", item, problems)
                elif isinstance(item, dict):
                    problems.append(f"{here}[{i}]: kuberay_crd.py has no facts for these items; add them there")


def _get(doc: dict, dotted: str):
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def _operator_rules(kind: str, doc: dict) -> list[str]:
    """Rules KubeRay's operator enforces beyond its CRDs (ray-operator/controllers/ray/utils/validation.go)."""
    problems = []
    name = _get(doc, "metadata.name")
    if not isinstance(name, str) or not _DNS1035.fullmatch(name) or len(name) > NAME_MAX[kind]:
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most {NAME_MAX[kind]} characters")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            problems.append("spec: a RayJob needs rayClusterSpec or clusterSelector")
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if _is_int(ttl) and ttl > 0 and spec.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        try:
            env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        except yaml.YAMLError as e:
            problems.append(f"spec.runtimeEnvYAML: not YAML ({e})")
        else:
            if not isinstance(env, dict):
                problems.append("spec.runtimeEnvYAML: not a YAML mapping")
    cluster = _get(doc, CLUSTER_PATH[kind])
    if not isinstance(cluster, dict):
        return problems
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    for label, group in groups:
        where = f"{CLUSTER_PATH[kind]}.{label}"
        if not isinstance(group, dict):
            continue
        if not _get(group, "template.spec.containers"):
            problems.append(f"{where}.template.spec.containers: needs at least one container")
        if "labels" in (group.get("rayStartParams") or {}):
            problems.append(f"{where}.rayStartParams: 'labels' is not allowed; use the group's labels field")
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if _is_int(lo) and _is_int(hi) and lo > hi:
            problems.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
    return problems


def validate(doc) -> list[str]:
    """Every way ``doc`` breaks the pinned KubeRay CRDs or the operator's rules; empty when it is valid."""
    if not isinstance(doc, dict):
        return ["the document is not a mapping"]
    problems = []
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: {doc.get('apiVersion')!r}, expected {API_VERSION}")
    kind = doc.get("kind")
    if kind not in KINDS:
        return problems + [f"kind: {kind!r} is not one of {', '.join(KINDS)}"]
    _walk(SCHEMA[kind], "", "", doc, problems)
    return problems + _operator_rules(kind, doc)


# ---------------------------------------------------------------------------------------------------
# Helpers for the repository checks

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _load(name: str) -> dict:
    (doc,) = _docs(DEPLOY / name)
    return doc


ALL_DOCS = [(p.name, i, d) for p in MANIFESTS for i, d in enumerate(_docs(p))]


def _cluster(doc: dict) -> dict:
    return _get(doc, CLUSTER_PATH[doc["kind"]])


def _groups(doc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in _cluster(doc)["workerGroupSpecs"]}


def _all_groups(doc: dict) -> list[dict]:
    cluster = _cluster(doc)
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


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


def _dockerfile() -> tuple[str, str]:
    """(Ray version of the base image, WORKDIR) from deploy/Dockerfile."""
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)\S*", text, re.M)
    workdir = re.search(r"^WORKDIR (\S+)", text, re.M)
    assert base and workdir, "deploy/Dockerfile must build FROM rayproject/ray:<version> and set WORKDIR"
    return base.group(1), workdir.group(1)


def _serve_apps(doc: dict) -> list[dict]:
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert isinstance(config, dict) and config.get("applications"), "serveConfigV2 names no applications"
    return config["applications"]


# ---------------------------------------------------------------------------------------------------
# The manifests against the CRD facts

def test_there_are_two_jobs_and_a_service():
    assert sorted(d["kind"] for _, _, d in ALL_DOCS) == ["RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("name, index, doc", ALL_DOCS, ids=[f"{n}#{i}" for n, i, _ in ALL_DOCS])
def test_manifest_is_valid_for_the_pinned_kuberay(name, index, doc):
    problems = validate(doc)
    assert not problems, f"{name} breaks KubeRay {KUBERAY_VERSION}:\n" + "\n".join(problems)


def _service() -> dict:
    return copy.deepcopy(_load("rayservice-serve.yaml"))


def _job() -> dict:
    return copy.deepcopy(_load("rayjob-train.yaml"))


def test_validator_sees_a_rayservice_with_the_rayjob_field_name():
    """The old mistake: RayService's cluster under RayJob's key ``rayClusterSpec``."""
    doc = _service()
    doc["spec"]["rayClusterSpec"] = doc["spec"].pop("rayClusterConfig")
    problems = validate(doc)
    assert any(p.startswith("spec.rayClusterSpec: unknown property") for p in problems), problems
    assert "spec.rayClusterConfig: required property missing" in problems


def test_validator_sees_missing_required_properties():
    doc = _job()
    del doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    del doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    del doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["name"]
    problems = validate(doc)
    assert "spec.rayClusterSpec.workerGroupSpecs[0].groupName: required property missing" in problems
    assert "spec.rayClusterSpec.headGroupSpec.template: required property missing" in problems
    assert ("spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].name: "
            "required property missing") in problems


def test_validator_sees_enum_type_and_bound_mistakes():
    doc = _job()
    spec, cluster = doc["spec"], doc["spec"]["rayClusterSpec"]
    spec["submissionMode"] = "K8sJob"
    spec["shutdownAfterJobFinishes"] = "true"
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"
    worker = cluster["workerGroupSpecs"][0]
    worker["minReplicas"] = "0"
    worker["maxReplicas"] = -1
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 0.5
    worker["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] = "1000 GiB"
    cluster["autoscalerOptions"]["upscalingMode"] = "Fast"
    problems = "\n".join(validate(doc))
    for expected in (
        "spec.submissionMode: 'K8sJob' is not one of K8sJobMode, HTTPMode, InteractiveMode, SidecarMode",
        "spec.shutdownAfterJobFinishes: expected boolean, got str",
        "spec.rayClusterSpec.headGroupSpec.rayStartParams: expected string map",
        "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas: expected integer, got str",
        "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas: -1 is below the minimum 0",
        "workerGroupSpecs[0].template.spec.containers[0].resources.limits: expected quantity map",
        "workerGroupSpecs[0].template.spec.containers[0].resources.requests: expected quantity map",
        "spec.rayClusterSpec.autoscalerOptions.upscalingMode: 'Fast' is not one of",
    ):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


def test_validator_sees_unknown_names_in_pod_templates_and_a_non_string_serve_config():
    doc = _service()
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["template"]["spec"]["containers"][0]["resource"] = head["template"]["spec"]["containers"][0].pop("resources")
    head["replicas"] = 1  # a worker-group field, not a head one
    doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])  # a mapping, not a string
    problems = "\n".join(validate(doc))
    assert "headGroupSpec.template.spec.containers[0].resource: unknown property" in problems
    assert "spec.rayClusterConfig.headGroupSpec.replicas: unknown property" in problems
    assert "spec.serveConfigV2: expected string, got dict" in problems


def test_validator_applies_the_operators_rules():
    doc = _job()
    doc["metadata"]["name"] = "R2D_train"
    doc["spec"]["shutdownAfterJobFinishes"] = False
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 3
    problems = "\n".join(validate(doc))
    assert "metadata.name: 'R2D_train' is not a DNS-1035 label" in problems
    assert "spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true" in problems
    assert "workerGroupSpecs[0]: minReplicas 3 > maxReplicas 2" in problems
    del doc["spec"]["rayClusterSpec"]
    assert "spec: a RayJob needs rayClusterSpec or clusterSelector" in validate(doc)


def test_validator_asks_for_facts_it_lacks():
    """A manifest that grows into an undescribed section is flagged, so kuberay_crd.py keeps up."""
    doc = _job()
    doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {}}
    doc["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    problems = "\n".join(validate(doc))
    assert "template.spec.affinity: allowed, but kuberay_crd.py does not describe its value" in problems
    assert "spec.deletionStrategy: kuberay_crd.py has no facts for this object" in problems


def test_validator_rejects_other_api_versions_and_kinds():
    doc = _job()
    doc["apiVersion"] = "ray.io/v1alpha1"
    assert validate(doc)[0].startswith("apiVersion: 'ray.io/v1alpha1'")
    doc["kind"] = "RayCronJob"
    assert validate(doc)[-1].startswith("kind: 'RayCronJob' is not one of")


def test_a_minimal_raycluster_is_valid():
    """RayCluster's facts are the same cluster schema at ``spec``."""
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "r2d"},
           "spec": copy.deepcopy(_job()["spec"]["rayClusterSpec"])}
    assert validate(doc) == []
    del doc["spec"]["headGroupSpec"]
    assert "spec.headGroupSpec: required property missing" in validate(doc)


# ---------------------------------------------------------------------------------------------------
# The manifests against this repository

@pytest.mark.parametrize("name, index, doc", ALL_DOCS, ids=[f"{n}#{i}" for n, i, _ in ALL_DOCS])
def test_one_image_built_from_the_dockerfile(name, index, doc):
    ray_version, workdir = _dockerfile()
    assert _cluster(doc)["rayVersion"] == ray_version, "rayVersion must match deploy/Dockerfile's base image"
    images = {_container(g)["image"] for _, _, d in ALL_DOCS for g in _all_groups(d)}
    assert len(images) == 1, f"every pod runs the project image, got {images}"
    for group in _all_groups(doc):
        assert _container(group).get("workingDir", workdir) == workdir
    if doc["kind"] == "RayJob":
        assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


@pytest.mark.parametrize("name, index, doc", ALL_DOCS, ids=[f"{n}#{i}" for n, i, _ in ALL_DOCS])
def test_head_runs_no_work_and_shares_env_with_workers(name, index, doc):
    head = _cluster(doc)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "work belongs on workers, not the head"
    envs = {e["name"] for e in _container(head)["env"]}
    assert "MLFLOW_TRACKING_URI" in envs
    for group in _cluster(doc)["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert {e["name"] for e in _container(group)["env"]} == envs, "head and workers must share env"


@pytest.mark.parametrize("name, job", [("rayjob-distill.yaml", "distill.py"), ("rayjob-train.yaml", "train_cpo.py")])
def test_job_entrypoints_reference_shipped_files(name, job):
    doc = _load(name)
    script, config = _entry_paths(doc["spec"]["entrypoint"])
    assert script.name == job
    assert script.is_file(), f"{script.relative_to(ROOT)} is missing"
    assert 'if __name__ == "__main__":' in script.read_text()
    assert config.is_file(), f"{config} missing"
    load_config(config)
    runtime_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    assert ".venv" in runtime_env["excludes"]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_serve_config_passes_rays_schema_and_imports_from_this_repo():
    from ray.serve.schema import ServeDeploySchema

    _, workdir = _dockerfile()
    doc = _load("rayservice-serve.yaml")
    # What the Ray dashboard applies to serveConfigV2 when KubeRay submits it.
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    for app in _serve_apps(doc):
        module, _, attr = app["import_path"].partition(":")
        assert attr, "import_path is module:attribute"
        source = ROOT / "platform" / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"{app['import_path']}: no module {source.relative_to(ROOT)}"
        assert f"def {attr}(args" in source.read_text(), f"{app['import_path']} is not a Serve application builder"
        assert (ROOT / app["args"]["config"]).is_file()
        load_config(ROOT / app["args"]["config"])
        # Serve takes only remote or local:// URIs; local:// points at the image's copy of the project.
        assert app["runtime_env"]["working_dir"] == f"local://{workdir}"


def test_distill_gpu_limits_match_the_recipe():
    doc = _load("rayjob-distill.yaml")
    _, config = _entry_paths(doc["spec"]["entrypoint"])
    cfg = load_config(config)
    groups = _groups(doc)
    assert _gpus(groups["gpu-teacher"]) >= engine_gpus(cfg.distill.engine) == 8
    assert _gpus(groups["gpu-guard"]) >= engine_gpus(cfg.distill.guard_engine) == 1
    assert groups["gpu-teacher"]["maxReplicas"] >= cfg.distill.engine.concurrency


def test_train_gpu_limits_match_the_recipe():
    doc = _load("rayjob-train.yaml")
    _, config = _entry_paths(doc["spec"]["entrypoint"])
    res = load_config(config).resources
    group = _groups(doc)["gpu-train"]
    per_pod = _gpus(group)
    workers_per_pod = per_pod // res.gpus_per_worker
    cpus = float(_container(group)["resources"]["limits"]["cpu"])
    assert cpus >= workers_per_pod * res.cpus_per_worker
    assert group["maxReplicas"] * workers_per_pod >= res.train_workers == 8
    assert doc["spec"]["backoffLimit"] >= 1


def test_service_serves_the_recipe_with_matching_replicas():
    doc = _load("rayservice-serve.yaml")
    (app,) = _serve_apps(doc)
    cfg = load_config(ROOT / app["args"]["config"])
    group = _groups(doc)["gpu-serve"]
    assert _gpus(group) >= cfg.serve.engine.num_gpus == 1
    assert group["maxReplicas"] >= cfg.serve.max_replicas
    assert group["minReplicas"] >= cfg.serve.min_replicas

def test_service_binds_publicly_only_with_keys_read_from_a_mounted_secret():
    """The RayService listens on 0.0.0.0: the ingress needs the API key, read from files on every pod, never env."""
    from pathlib import PurePosixPath

    from r2d.serve.auth import preflight

    doc = _load("rayservice-serve.yaml")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = _serve_apps(doc)
    args = dict(app["args"])
    cfg = load_config(ROOT / args.pop("config"), [f"{k}={v}" for k, v in args.items()])
    assert cfg.serve.host == serve_cfg["http_options"]["host"] == "0.0.0.0"
    preflight(cfg.serve)  # refused without a key; the key file is set
    spec = doc["spec"]["rayClusterConfig"]
    for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
        mounts = {m["mountPath"]: m["name"] for m in _container(group).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        secret = volumes[mounts[str(PurePosixPath(cfg.serve.api_key_file).parent)]]["secret"]
        assert secret["secretName"] == "r2d-secrets"
        assert {i["path"] for i in secret["items"]} >= {PurePosixPath(cfg.serve.api_key_file).name,
                                                       PurePosixPath(cfg.serve.admin_key_file).name}
        assert not any("KEY" in e["name"] for e in _container(group)["env"]), "keys travel as files, not env"
