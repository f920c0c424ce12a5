"""``r2d check``: everything a run will need, checked before ``ray up`` spends money on it.

One line per problem, naming the config field; notes say what could only be checked later
(a Hub model that downloads at run time, a Hub that cannot be reached from here):

- data: every prompt source loads and has the columns its mapping names (a Hub dataset is
  checked against the Hub's own metadata, without downloading it);
- models: every model id or URI resolves: a local folder, the bundled model, the registry,
  the local Hugging Face cache, or the Hub (gated repositories say so);
- storage: every location is well formed, reachable and writable (a probe object is written
  and deleted), and not node-local when the run spans several nodes;
- resources: every engine replica and training worker fits a node type of the cluster file,
  a tensor-parallel group fits one node's GPUs;
- gates: the promotion gates can reject a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from r2d import storage as st
from r2d.config import Config, ConfigError


@dataclass
class Report:
    """What the checks found: problems (the run would fail) and notes (what happens later)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"FAIL {p}" for p in self.problems] + [f"note {n}" for n in self.notes]


def check(cfg: Config, cluster: dict | None = None, nodes: int = 1) -> Report:
    """Run every check; ``cluster`` is a launcher config (cluster.yaml) or None, ``nodes`` the node count."""
    from r2d.placement import cluster_max_nodes, recipe_fit_problems

    report = Report()
    nodes = max(nodes, cluster_max_nodes(cluster) if cluster else 1)
    check_sources(cfg, report)
    check_models(cfg, report)
    check_storage(cfg, report, nodes > 1)
    if cluster:
        report.problems += recipe_fit_problems(cfg, cluster)
    else:
        report.notes.append("resources: no --cluster file given; engine and worker sizes not checked")
    check_gates(cfg, report)
    return report


# ---------------------------------------------------------------- data

def check_sources(cfg: Config, report: Report) -> None:
    from r2d.data.prompts import PromptSourceError
    from r2d.data.sources import load_source
    from r2d.data.splits import source_specs

    for i, spec in enumerate(source_specs(cfg)):
        name = f"data.sources[{i}]"
        if spec["name"] == "hf" and not Path(spec["path"]).expanduser().exists():
            _check_hub_dataset(name, spec, report)
            continue
        try:
            rows = load_source(spec)
        except (PromptSourceError, OSError) as err:
            report.problems.append(f"{name}: {err}")
            continue
        if not rows:
            report.problems.append(f"{name}: {spec['name']} {spec.get('path', '')} yields no prompts")


def _check_hub_dataset(name: str, spec: dict, report: Report) -> None:
    """A Hub dataset: it exists, and its card lists the mapped columns (nothing is downloaded)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    repo = spec["path"]
    try:
        info = _hub().dataset_info(repo, timeout=15)
    except GatedRepoError:
        report.notes.append(f"{name}: Hub dataset {repo} is gated: the nodes need HF_TOKEN with access")
        return
    except RepositoryNotFoundError:
        report.problems.append(f"{name}: {repo!r} is not a dataset on the Hugging Face Hub (nor a local path)")
        return
    except Exception as err:  # offline, unreachable: nothing to say about the dataset itself
        report.notes.append(f"{name}: Hub dataset {repo} not verified ({_short(err)}); it downloads at run time")
        return
    features = ((getattr(info, "card_data", None) or {}).get("dataset_info") or {})
    features = features[0] if isinstance(features, list) and features else features
    columns = [f.get("name") for f in (features.get("features") or [])] if isinstance(features, dict) else []
    wanted = {"prompt": spec.get("column") or "prompt", "input": spec.get("input_column", ""),
              "reference": spec.get("reference_column", "")}
    missing = [(role, col) for role, col in wanted.items() if col and columns and col not in columns]
    if missing:
        role, col = missing[0]
        report.problems.append(f"{name}: hf:{repo}: no {col!r} column (the {role}); columns found: {columns}")
    elif not columns:
        report.notes.append(f"{name}: Hub dataset {repo} exists; its card lists no columns to check")
    else:
        report.notes.append(f"{name}: Hub dataset {repo} has the mapped columns; it downloads at run time")


# ---------------------------------------------------------------- models

def model_fields(cfg: Config) -> dict[str, object]:
    """Every model a run loads, by dotted field: ``(source, offline)`` pairs."""
    fields = {"model.source": (cfg.model.source, cfg.model.offline),
              "distill.teacher.source": (cfg.distill.teacher.source, cfg.distill.teacher.offline),
              "serve.model": (cfg.serve.model, cfg.model.offline)}
    if cfg.distill.tagger == "guard":
        fields["distill.guard.source"] = (cfg.distill.guard.source, cfg.distill.guard.offline)
    if cfg.eval.judge != "refusal":
        fields["eval.judge_model.source"] = (cfg.eval.judge_model.source, cfg.eval.judge_model.offline)
    if cfg.distill.engine.kind == "openai":
        del fields["distill.teacher.source"]  # the endpoint serves it: its name is checked there
    return fields


def check_models(cfg: Config, report: Report) -> None:
    seen: dict[str, str] = {}
    for name, (source, offline) in model_fields(cfg).items():
        if source in seen:
            continue
        seen[source] = name
        problem, note = resolve_model(str(source), bool(offline), cfg)
        if problem:
            report.problems.append(f"{name}: {problem}")
        elif note:
            report.notes.append(f"{name}: {note}")


def resolve_model(source: str, offline: bool, cfg: Config) -> tuple[str, str]:
    """(problem, note) for one model source; a problem is empty when the source resolves."""
    from r2d.models import ModelSourceError, bundled_gguf

    if not source:
        return "empty model source", ""
    if source.startswith("bundled:"):
        try:
            bundled_gguf(source.split(":", 1)[1])
        except ModelSourceError as err:
            return str(err), ""
        return "", ""
    if source.startswith("models:/"):
        return _registry_model(source, cfg)
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.endswith(".gguf"):
        if source.endswith(".gguf"):
            return ("", "") if path.is_file() else (f"{source}: GGUF file does not exist", "")
        if not path.joinpath("config.json").is_file():
            return f"{source}: not a Hugging Face model folder (no config.json)", ""
        return "", ""
    return _hub_model(source, offline)


def _registry_model(source: str, cfg: Config) -> tuple[str, str]:
    from r2d.tracking import TrackingError, connect, parse_model_uri, resolve_version

    try:
        ref = parse_model_uri(source)
    except TrackingError as err:
        return str(err), ""
    produced = ref.name == cfg.tracking.registered_model and ref.alias in ("challenger", "champion")
    try:
        resolve_version(connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s), source)
    except TrackingError as err:
        if produced:
            return "", f"{source} does not exist yet; training registers it (and promotion moves champion)"
        return str(err), ""
    return "", ""


def _hub_model(repo: str, offline: bool) -> tuple[str, str]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return "", ""
    if offline:
        return f"{repo}: not in the local Hugging Face cache and offline is true (set offline: false to download)", ""
    try:
        info = _hub().model_info(repo, timeout=15)
    except GatedRepoError:
        return "", f"{repo} is gated on the Hub: the nodes need HF_TOKEN with access"
    except RepositoryNotFoundError:
        return f"{repo!r} is not a model on the Hugging Face Hub (nor a local folder or a models:/ URI)", ""
    except Exception as err:  # offline, unreachable
        return "", f"{repo} not verified ({_short(err)}); it downloads from the Hub at run time"
    gated = " (gated: the nodes need HF_TOKEN with access)" if getattr(info, "gated", False) else ""
    return "", f"{repo} downloads from the Hugging Face Hub at run time{gated}"


# ---------------------------------------------------------------- storage

# Locations every node reads or writes (workers read the traces, write checkpoints); reports are the driver's.
SHARED = ("distill.output_dir", "train.traces", "train.storage_path")


def storage_fields(cfg: Config) -> dict[str, str]:
    fields = {"distill.output_dir": cfg.distill.output_dir, "train.storage_path": cfg.train.storage_path,
              "eval.output_dir": cfg.eval.output_dir}
    if cfg.train.traces:
        fields["train.traces"] = cfg.train.traces
    return fields


def check_storage(cfg: Config, report: Report, multi_node: bool) -> None:
    """Form, sharing and a write probe per location; a store that refuses writes is one line, not one per field."""
    failed: dict[str, tuple[list[str], str]] = {}
    for name, uri in storage_fields(cfg).items():
        try:
            st.check_shared(uri, name, multi_node and name in SHARED)
        except ConfigError as err:
            report.problems.append(str(err))
            continue
        location = st.absolute(uri)
        try:
            st.probe_writable(location)
        except st.StorageError as err:
            root = location.split("/", 3)[2] if not st.is_local(location) else location
            where = f"{location.split('://')[0]}://{root}" if not st.is_local(location) else root
            fields, _ = failed.setdefault(where, ([], str(err)))
            fields.append(name)
    for where, (fields, error) in failed.items():
        report.problems.append(f"{', '.join(fields)}: {where} is not writable: {error}")


# ---------------------------------------------------------------- gates

def check_gates(cfg: Config, report: Report) -> None:
    """Each promotion gate must be able to say no."""
    g = cfg.gates
    if g.asr_tolerance >= 1:
        report.problems.append(f"gates.asr_tolerance: {g.asr_tolerance} lets any rise in attack success through")
    if g.max_over_refusal >= 1:
        report.problems.append(f"gates.max_over_refusal: {g.max_over_refusal} lets any over-refusal through")
    if g.min_discrimination <= -1:
        report.problems.append(f"gates.min_discrimination: {g.min_discrimination} accepts a model that refuses "
                               "only benign prompts")


def _hub():
    """The Hub's API client, at ``HF_ENDPOINT`` when set (a mirror) as read now, not at import."""
    import os

    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__
