"""Lineage: follow a model version back to its prompts, and a traces dataset forward to its models.

The chain lives in MLflow's own objects, so the MLflow UI shows it too:

    model version  --tags r2d.train_run_id / run_id-->  training run
    training run   --dataset input (traces digest, source) + tags r2d.traces_*-->  traces
    traces         --tag r2d.distill_run_id (manifest mlflow_run_id)-->  distillation run
    distillation   --tags r2d.teacher, r2d.tagger, r2d.system_prompt_id, r2d.prompt_sources,
                     r2d.config_digest-->  where the data came from

Backward (:func:`trace_back`) prefers the tags copied onto the version and falls back to the
runs they point at, so a version registered with fewer tags still resolves. Forward
(:func:`trace_forward`) searches runs by the traces-digest tag and by dataset digest, then the
model versions tagged with the digest or created from those runs.
"""

from __future__ import annotations

import json
from typing import Any

from r2d import run_tags as T
from r2d.tracking import TrackingError, all_experiment_ids, get_run, load_json_tag, resolve_version

_EVAL_METRICS = ("asr", "over_refusal", "discrimination")


def _r2d_tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted((tags or {}).items()) if k.startswith("r2d.")}


def _datasets(run) -> list[dict[str, Any]]:
    """The run's dataset inputs: name, digest, source and context (training, eval, ...)."""
    out = []
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        ds = item.dataset
        try:
            source = json.loads(ds.source)
        except (TypeError, ValueError):
            source = ds.source
        context = next((t.value for t in item.tags or [] if t.key == "mlflow.data.context"), "")
        out.append({"name": ds.name, "digest": ds.digest, "source_type": ds.source_type,
                    "source": source, "context": context})
    return out


def _run_summary(client, run) -> dict[str, Any]:
    tags = run.data.tags
    artifacts = []
    try:
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id) if "config" in a.path.lower()]
    except Exception:  # an unreachable artifact store must not hide the rest of the chain
        pass
    return {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
            "status": run.info.status, "stage": tags.get(T.STAGE, ""), "config_digest": tags.get(T.CONFIG_DIGEST, ""),
            "git_commit": tags.get(T.GIT_COMMIT, ""), "config_artifacts": artifacts,
            "datasets": _datasets(run), "tags": _r2d_tags(tags)}


def _first(*values: Any) -> Any:
    return next((v for v in values if v), None)


def _traces_from(version_tags: dict, train: dict | None) -> dict[str, Any]:
    train_tags = (train or {}).get("tags", {})
    inputs = [d for d in (train or {}).get("datasets", []) if d["context"] in ("training", "train", "")]
    inputs = inputs or (train or {}).get("datasets", [])
    ds = inputs[0] if inputs else {}
    source = ds.get("source")
    source_uri = source.get("uri") or source.get("path") if isinstance(source, dict) else source
    return {"digest": _first(version_tags.get(T.TRACES_DIGEST), train_tags.get(T.TRACES_DIGEST), ds.get("digest")),
            "uri": _first(version_tags.get(T.TRACES_URI), train_tags.get(T.TRACES_URI), source_uri),
            "dataset_input": ds or None}


def _find_distill_run(client, digest: str | None):
    if not digest:
        return None
    runs = client.search_runs(all_experiment_ids(client),
                              f"tags.`{T.TRACES_DIGEST}` = '{digest}' and tags.`{T.STAGE}` = 'distill'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _evaluations(client, version_tags: dict) -> list[dict[str, Any]]:
    out = []
    for key, run_id in sorted(version_tags.items()):
        if not key.startswith(T.EVAL_RUN_PREFIX):
            continue
        entry = {"suite_digest": key[len(T.EVAL_RUN_PREFIX):], "run_id": run_id, "metrics": {}}
        try:
            metrics = client.get_run(run_id).data.metrics
            entry["metrics"] = {k: metrics[k] for k in _EVAL_METRICS if k in metrics}
        except Exception:
            entry["missing"] = True
        out.append(entry)
    return out


def trace_back(client, model_uri: str) -> dict[str, Any]:
    """Follow ``model_uri`` back to its training run, traces, distillation run and prompt sources.

    Returns:
        ``{"model", "train_run", "traces", "distill_run", "evaluations", "promotion", "missing"}``;
        a link that cannot be followed is None and named in ``missing``.

    Raises:
        TrackingError: the model, alias or version does not exist.
    """
    mv = resolve_version(client, model_uri)
    vtags = dict(mv.tags or {})
    aliases = [a for a in (getattr(mv, "aliases", None) or [])]
    out: dict[str, Any] = {"model": {"uri": model_uri, "name": mv.name, "version": str(mv.version),
                                     "aliases": sorted(aliases), "source": mv.source, "run_id": mv.run_id,
                                     "base_model": vtags.get(T.BASE_MODEL, ""), "tags": _r2d_tags(vtags)},
                           "missing": []}
    train_id = _first(vtags.get(T.TRAIN_RUN_ID), mv.run_id)
    train = _run_summary(client, get_run(client, train_id, "training run")) if train_id else None
    if train is None:
        out["missing"].append(f"training run: version {mv.version} has no {T.TRAIN_RUN_ID} tag and no run_id")
    out["train_run"] = train
    traces = _traces_from(vtags, train)
    if not traces["digest"]:
        out["missing"].append(f"traces digest: no {T.TRACES_DIGEST} tag and no dataset input on the training run")
    out["traces"] = traces
    train_tags = (train or {}).get("tags", {})
    distill_id = _first(vtags.get(T.DISTILL_RUN_ID), train_tags.get(T.DISTILL_RUN_ID))
    distill_run = get_run(client, distill_id, "distillation run") if distill_id else _find_distill_run(
        client, traces["digest"])
    out["distill_run"] = _distill_summary(client, distill_run) if distill_run else None
    if distill_run is None:
        out["missing"].append(f"distillation run: no {T.DISTILL_RUN_ID} tag and no distill run with traces "
                              f"digest {traces['digest']}")
    out["evaluations"] = _evaluations(client, vtags)
    out["promotion"] = {"decision": vtags.get(T.DECISION), "reason": vtags.get(T.REASON)}
    return out


def _distill_summary(client, run) -> dict[str, Any]:
    summary = _run_summary(client, run)
    tags = run.data.tags
    summary.update(teacher=tags.get(T.TEACHER, ""), tagger=tags.get(T.TAGGER, ""),
                   system_prompt_id=tags.get(T.SYSTEM_PROMPT_ID, ""),
                   prompt_sources=load_json_tag(tags, T.PROMPT_SOURCES, []),
                   prompts_digest=tags.get(T.PROMPTS_DIGEST, ""), traces_digest=tags.get(T.TRACES_DIGEST, ""),
                   traces_uri=tags.get(T.TRACES_URI, ""))
    return summary


def trace_forward(client, digest: str) -> dict[str, Any]:
    """Every run and model version that used the traces dataset with ``digest``.

    ``digest`` may be a prefix (jobs print the first 16 characters); at least 8 are needed.

    Returns:
        ``{"digest", "distill_runs", "train_runs", "other_runs", "model_versions"}``; runs are
        matched by the ``r2d.traces_digest`` tag or by a dataset input with that digest.
    """
    digest = digest.strip().lower()
    if len(digest) < 8 or not all(c in "0123456789abcdef" for c in digest):
        raise TrackingError(f"traces digest {digest!r}: expected at least 8 hex characters of the manifest's digest")
    experiments = all_experiment_ids(client)
    runs = {r.info.run_id: r for r in client.search_runs(experiments, f"tags.`{T.TRACES_DIGEST}` LIKE '{digest}%'")}
    # The store keeps dataset digests at most 36 characters long: match a prefix both ways.
    for run in client.search_runs(experiments, f"dataset.digest LIKE '{digest[:16]}%'"):
        if any(digest.startswith(d["digest"]) or d["digest"].startswith(digest) for d in _datasets(run)):
            runs.setdefault(run.info.run_id, run)
    by_stage: dict[str, list] = {"distill": [], "train": [], "other": []}
    for run in sorted(runs.values(), key=lambda r: r.info.start_time or 0):
        stage = run.data.tags.get(T.STAGE, "")
        by_stage[stage if stage in ("distill", "train") else "other"].append(
            {"run_id": run.info.run_id, "run_name": run.info.run_name, "stage": stage, "status": run.info.status})
    versions = {(mv.name, str(mv.version)): mv
                for mv in client.search_model_versions(f"tags.`{T.TRACES_DIGEST}` LIKE '{digest}%'")}
    for run in by_stage["train"] + by_stage["other"]:
        for mv in client.search_model_versions(f"run_id = '{run['run_id']}'"):
            versions.setdefault((mv.name, str(mv.version)), mv)
    # Search results leave aliases out; fetch each version to show which one serves.
    versions = {key: client.get_model_version(*key) for key in versions}
    model_versions = [{"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
                       "aliases": sorted(getattr(mv, "aliases", None) or []), "uri": f"models:/{mv.name}/{mv.version}"}
                      for _, mv in sorted(versions.items(), key=lambda kv: (kv[0][0], int(kv[0][1])))]
    return {"digest": digest, "distill_runs": by_stage["distill"], "train_runs": by_stage["train"],
            "other_runs": by_stage["other"], "model_versions": model_versions}


def _sources_text(sources: Any) -> str:
    if not isinstance(sources, list):
        return str(sources)
    parts = []
    for src in sources:
        if isinstance(src, dict):
            extras = ", ".join(f"{k}={v}" for k, v in src.items() if k != "name" and v not in ("", 0, None))
            parts.append(f"{src.get('name', '?')}({extras})" if extras else str(src.get("name", "?")))
        else:
            parts.append(str(src))
    return ", ".join(parts)


def format_back(chain: dict[str, Any]) -> str:
    """Print a :func:`trace_back` chain, one link per line, from the model back to the prompts."""
    m = chain["model"]
    lines = [f"model        {m['uri']} -> {m['name']} version {m['version']} "
             f"(aliases: {', '.join(m['aliases']) or 'none'})",
             f"  source     {m['source']}"]
    if m.get("base_model"):
        lines.append(f"  base model {m['base_model']}")
    if chain["train_run"]:
        t = chain["train_run"]
        lines.append(f"training run {t['run_id']} '{t['run_name']}' [{t['status']}] config {t['config_digest'] or '?'} "
                     f"commit {t['git_commit'][:12] or '?'}")
    traces = chain["traces"]
    lines.append(f"traces       digest {traces['digest'] or '?'} at {traces['uri'] or '?'}")
    d = chain["distill_run"]
    if d:
        lines += [f"distill run  {d['run_id']} '{d['run_name']}' [{d['status']}] config {d['config_digest'] or '?'}",
                  f"  teacher    {d['teacher'] or '?'}",
                  f"  tagger     {d['tagger'] or '?'}",
                  f"  system prompt {d['system_prompt_id'] or '?'}",
                  f"prompts      {_sources_text(d['prompt_sources'])} (digest {d['prompts_digest'] or '?'})"]
    for ev in chain["evaluations"]:
        numbers = " ".join(f"{k}={v:.3f}" for k, v in ev["metrics"].items())
        lines.append(f"evaluation   suite {ev['suite_digest']} run {ev['run_id']} {numbers}".rstrip())
    if chain["promotion"]["decision"]:
        lines.append(f"promotion    {chain['promotion']['decision']}: {chain['promotion']['reason']}")
    lines += [f"MISSING      {item}" for item in chain["missing"]]
    return "\n".join(lines)


def format_forward(found: dict[str, Any]) -> str:
    """Print a :func:`trace_forward` result."""
    lines = [f"traces digest {found['digest']}"]
    for key, title in (("distill_runs", "distilled by"), ("train_runs", "trained"), ("other_runs", "used by")):
        lines += [f"  {title:12} run {r['run_id']} '{r['run_name']}' [{r['status']}]" for r in found[key]]
    lines += [f"  model        {v['uri']} (aliases: {', '.join(v['aliases']) or 'none'}) from run {v['run_id']}"
              for v in found["model_versions"]]
    if not found["model_versions"]:
        lines.append("  no model version was trained on it")
    return "\n".join(lines)
