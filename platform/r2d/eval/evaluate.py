"""Evaluate several models on the same prompts: the library entry point behind ``jobs/evaluate.py``.

:func:`evaluate_models` is what the job, promotion and the demo call (no subprocess):

1. load the suites once, so every model sees the same prompts (one ``suite_digest``);
2. check the prompts against the training traces (exact and near duplicates) and
   refuse to report contaminated numbers as held-out unless told to;
3. per model: generate through the engines, judge, score, and (optionally) lm-eval;
4. write the Markdown report, charts and JSON; log one MLflow parent run with a
   child run per model, and tag each registered model version it scored with
   ``r2d.eval_run.<suite_digest>`` = the child run's id, so promotion can reuse it.

Re-running is cheap: a model whose evaluation already exists for the same inputs (the
pinned version or the same files, the same suites, judge, sampling and filter: its
:func:`eval_key`) is not generated again; its numbers come back from that run's
``result.json``, marked ``reused``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from r2d import run_tags as T
from r2d import storage as st
from r2d.eval.contamination import assert_held_out, check_contamination
from r2d.eval.general import general_ability
from r2d.eval.judges import keyword_judge_quality
from r2d.eval.metrics import VERDICT_KEYS
from r2d.eval.report import output_json, write_report
from r2d.eval.runner import Target, make_targets, run_target
from r2d.eval.suites import Suite, load_suites, suite_digest

__all__ = ["contamination_report", "eval_code", "eval_key", "evaluate_models", "find_reusable", "traces_prompts"]


def traces_prompts(path: str) -> list[str] | None:
    """The ``prompt`` column of a traces dataset, and the plain requests inside its wrapped prompts
    (``request``, where present), or None when there is none at ``path``.

    ``path`` is a distillation output (a folder or an object-store prefix, read through
    :mod:`r2d.distill.store`, which sees only committed chunks) or any Parquet file, folder
    or prefix with a ``prompt`` column. Relative paths are under the workdir, where
    distillation writes them.
    """
    import pyarrow.dataset as pads

    from r2d.distill import store as traces_io

    uri = st.absolute(path)
    if traces_io.exists(uri):
        return _texts(traces_io.read_table(uri, ["prompt", "request"]))
    if st.is_local(uri):
        if not Path(uri).exists():
            return None
        files = [uri] if Path(uri).is_file() else [f for f in st.list_files(uri) if f.endswith(".parquet")]
    else:
        files = [f for f in st.list_files(uri) if f.endswith(".parquet")]
    if not files:
        return None
    fs, _ = st.filesystem(files[0])
    data = pads.dataset([st.filesystem(f)[1] for f in files], format="parquet", filesystem=fs)
    if "prompt" not in data.schema.names:
        raise ValueError(f"traces dataset {path!r} has no 'prompt' column (columns: {data.schema.names})")
    return _texts(data.to_table(columns=[c for c in ("prompt", "request") if c in data.schema.names]))


def _texts(table) -> list[str]:
    """The non-empty texts of a table read as (prompt[, request]): the prompts, then the requests they wrap."""
    return [t for c in table.column_names for t in table.column(c).to_pylist() if t]


def trained_attacks(traces: str) -> list[str]:
    """The attacks whose templates wrapped training prompts of the traces at ``traces`` (the ``distill.attacks``
    their manifest records), [] for plain traces or none there."""
    from r2d.distill import store as traces_io

    try:
        manifest = traces_io.read_manifest(traces)
    except (OSError, ValueError):  # an unreadable manifest, or a path that is not a traces folder
        return []
    return list(((manifest.get("config") or {}).get("distill") or {}).get("attacks") or [])


def contamination_report(suites: list[Suite], traces: str, threshold: float, allow: bool) -> dict[str, Any]:
    """Overlap between the suites' unattacked prompts and the traces' prompts.

    Raises:
        ContaminationError: when any prompt overlaps and ``allow`` is False.
    """
    train = traces_prompts(traces)
    if train is None:
        return {"checked": False, "traces": traces, "reason": f"no traces dataset at {traces!r}"}
    # Base prompts: a jailbreak template shared by two different requests would look like a near duplicate.
    evals = sorted({r["base_prompt"] for s in suites for r in s.rows})
    report = check_contamination(evals, train, threshold)
    assert_held_out(report, allow)
    return {"checked": True, "traces": traces, "n_eval": report["n_eval"], "n_train": report["n_train"],
            "threshold": threshold, "exact": report["exact"]["count"], "near": report["near"]["count"],
            "clean": report["clean"], "examples": report["examples"]}


def _pin_versions(targets: list[Target]) -> dict[str, str]:
    """Resolve registry aliases once, so a moving alias cannot change the weights mid-run."""
    from r2d.tracking import connect, resolve_version

    versions = {}
    for t in targets:
        if t.source.startswith("models:/"):
            mv = resolve_version(connect(), t.source)
            versions[t.name] = str(mv.version)
            t.model = dataclasses.replace(t.model, source=f"models:/{mv.name}/{mv.version}")
    return versions


def _fingerprint(source: str) -> list:
    """What identifies a non-registry source's weights: the files' sizes and times (a folder can be rebuilt)."""
    from r2d.models import BUNDLED, bundled_gguf

    if source.startswith("bundled:") and source.split(":", 1)[1] in BUNDLED:
        path = bundled_gguf(source.split(":", 1)[1])
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]
    folder = Path(source).expanduser()
    if folder.is_dir():
        return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.iterdir()
                      if f.suffix in (".safetensors", ".json"))
    return []


# What an evaluation executes: a change here (a judge fixed, an engine's decoding) is new numbers.
EVAL_SOURCE = ("eval", "engines", "refusal.py", "llama_guard.py", "pivots.py", "models.py")


def eval_code() -> str:
    """The digest of the source an evaluation runs (:data:`EVAL_SOURCE`)."""
    from r2d.runtime import source_digest

    return source_digest(*EVAL_SOURCE)


def eval_key(cfg, target: Target, digest: str) -> str:
    """A digest of everything an evaluation's numbers depend on, for one target (after pinning).

    The model (a pinned ``models:/name/N``, or a source and its files), its system prompt,
    the suites' digest, the judge and its model, sampling, the output filter, the general tasks
    and the source of the code that generates and judges (:data:`EVAL_SOURCE`).
    """
    e = cfg.eval
    payload = {"source": target.model.source, "files": _fingerprint(target.model.source),
               "dtype": target.model.dtype, "system_prompt": target.system_prompt, "suite_digest": digest,
               "engine": target.engine.kind, "judge": e.judge,
               "judge_model": dataclasses.asdict(e.judge_model) if e.judge != "refusal" else None,
               "sampling": dataclasses.asdict(e.sampling), "output_filter": e.output_filter,
               "general": [e.general_tasks, e.general_limit], "code": eval_code()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_reusable(cfg, key: str) -> dict[str, Any] | None:
    """The result entry of the newest finished evaluation run with this :func:`eval_key`, or None."""
    import mlflow
    from mlflow import MlflowClient

    from r2d.runtime import init_mlflow

    init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    runs = MlflowClient().search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                      filter_string=f"tags.`{T.EVAL_KEY}` = '{key}' and "
                                                    "attributes.status = 'FINISHED'", max_results=5)
    for run in runs:
        try:
            entry = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/result.json")
        except Exception:  # an evaluation logged before results were stored: not reusable
            continue
        return {**entry, "run_id": run.info.run_id, "parent_run_id": run.data.tags.get("mlflow.parentRunId", ""),
                "reused": True, "records": []}
    return None


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def model_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one model: rates, interval bounds, pivots, lengths, ability."""
    out: dict[str, Any] = {"n_harmful": entry["n_harmful"], "n_benign": entry["n_benign"]}
    for key in ("asr", "over_refusal", "over_refusal_lookalike", "discrimination", "benign_restated"):
        out[key] = entry.get(key)
        ci = entry.get(f"{key}_ci")
        if ci:
            out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = ci
    for attack, value in (entry.get("asr_by_attack") or {}).items():
        name = _metric_name(attack)
        out[f"asr_{name}"] = value
        ci = (entry.get("asr_by_attack_ci") or {}).get(attack)
        if ci:
            out[f"asr_{name}_lo"], out[f"asr_{name}_hi"] = ci
    for attack, value in (entry.get("over_refusal_by_attack") or {}).items():
        out[f"over_refusal_{_metric_name(attack)}"] = value
    for key in ("asr", "over_refusal", "discrimination"):
        out[f"raw_{key}"] = (entry.get("raw") or {}).get(key)
    verdict = [k for k in VERDICT_KEYS if not k.endswith("_ci")]
    for key in ("pivot_accuracy", "safe_share", "unsafe_share", "rethink_share", *verdict):
        out[key] = (entry.get("pivots") or {}).get(key)
    out["mean_output_tokens"] = entry.get("mean_output_tokens")
    out["tokens_per_s"] = entry.get("tokens_per_s")
    ood = entry.get("ood") or {}
    for key in ("asr", "over_refusal", "over_refusal_lookalike", "discrimination", "benign_restated", "n_harmful",
                "n_benign", *verdict):
        out[f"ood_{key}"] = ood.get(key)
        ci = ood.get(f"{key}_ci")
        if ci:
            out[f"ood_{key}_ci_lo"], out[f"ood_{key}_ci_hi"] = ci
    for attack, value in (ood.get("asr_by_attack") or {}).items():
        out[f"ood_asr_{_metric_name(attack)}"] = value
    for suite, numbers in (entry.get("by_suite") or {}).items():
        for key in ("asr", "over_refusal", "discrimination"):
            out[f"suite_{_metric_name(suite)}_{key}"] = numbers.get(key)
    general = entry.get("general") or {}
    if general.get("status") == "ok":
        out["ability"] = general["ability"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _log_mlflow(cfg, results: dict[str, dict], paths: dict[str, Path], meta: dict[str, Any]) -> str:
    """One parent run (report, charts, JSON, config) and a child run per model; tags the versions scored."""
    from mlflow import MlflowClient

    from r2d.runtime import init_mlflow

    mlflow = init_mlflow(cfg.tracking.experiment, cfg.tracking.uri)
    client = MlflowClient()
    digest = meta["suite_digest"]
    common = {T.STAGE: "eval", T.SUITE_DIGEST: digest, T.CONFIG_DIGEST: cfg.digest(), T.GIT_COMMIT: meta["git_commit"]}
    shared = [p for k, p in paths.items() if not k.startswith("records:")]
    with mlflow.start_run(run_name=f"eval-{digest[:8]}", tags={**common, T.JUDGE: cfg.eval.judge}) as parent:
        mlflow.log_params({"models": json.dumps(list(results))[:500], "suites": json.dumps(
            [s["name"] for s in meta["suites"]])[:500], "judge": cfg.eval.judge, "output_filter": cfg.eval.output_filter})
        mlflow.log_dict(cfg.to_dict(), "config.json")
        for p in shared:
            mlflow.log_artifact(str(p))
        for name, entry in results.items():
            if entry.get("reused"):
                continue  # its run already holds it
            model_tags = {**common, T.MODEL_URI: entry["model_uri"], T.JUDGE: entry["judge"],
                          T.EVAL_KEY: entry["eval_key"], T.EVAL_CODE: eval_code()}
            registered = entry["model_uri"][len("models:/"):].split("@")[0].split("/")[0]
            if entry.get("model_version"):
                model_tags.update({T.MODEL_VERSION: entry["model_version"], T.MODEL_NAME: registered})
            with mlflow.start_run(run_name=f"eval-{name}"[:250], nested=True, tags=model_tags) as child:
                mlflow.log_metrics(model_metrics(entry))
                for p in shared + [paths[f"records:{name}"]]:
                    mlflow.log_artifact(str(p))
                entry["run_id"], entry["parent_run_id"] = child.info.run_id, parent.info.run_id
                mlflow.log_dict(output_json({name: entry})[name], "result.json")
            if entry.get("model_version"):
                client.set_model_version_tag(registered, entry["model_version"], T.EVAL_RUN_PREFIX + digest,
                                             entry["run_id"])
        # Re-log the JSON so the copy in MLflow carries the run ids too.
        paths["json"].write_text(json.dumps(output_json(results), indent=2) + "\n")
        mlflow.log_artifact(str(paths["json"]))
    return parent.info.run_id


def evaluate_models(cfg, models: list[str], suites: list[str] | None = None, *, output: str | None = None,
                    prompt_only_baseline: bool = False, traces: str | None = None,
                    allow_contamination: bool | None = None, out_dir: str | None = None,
                    log_mlflow: bool = True, reuse: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate ``models`` on ``suites`` (same prompts for all) and report.

    Args:
        cfg: Job config; ``cfg.eval`` holds the judge, engine, sampling, caps and filter.
        models: Folders, ``models:/name@alias``, ``bundled:`` names, hub ids or http(s) endpoints.
        suites: Built-in suite names or files; None uses ``cfg.eval.suites``.
        output: Also write the JSON here.
        prompt_only_baseline: Add R2D-p (``cfg.model.source`` + the safety system prompt).
        traces: Traces dataset for the contamination check and the report's trained-attack marks (its manifest);
            default ``eval.traces`` or ``distill.output_dir``.
        allow_contamination: Override ``eval.allow_contamination``.
        out_dir: Report folder; default ``<eval.output_dir>/<time>-<digest>``.
        log_mlflow: Log the MLflow runs and tag model versions.
        reuse: Take a model's numbers from an earlier evaluation with the same :func:`eval_key`
            instead of generating again (needs ``log_mlflow``).

    Returns:
        ``{model: {"asr", "asr_by_attack", "over_refusal", "discrimination", "discrimination_ci",
        "n_harmful", "n_benign", "judge", ..., "run_id", "parent_run_id", "report"}}``.

    Raises:
        ContaminationError: Prompts overlap the training traces and contamination is not allowed.
        SuiteError: A suite is unknown, malformed or empty.
    """
    from r2d.runtime import init_ray

    # 1. the same prompts for every model
    loaded = load_suites(list(suites or cfg.eval.suites), cfg)
    rows = [{**r, "row": i} for i, r in enumerate(r for s in loaded for r in s.rows)]
    digest = suite_digest(loaded)
    if any(str(m).startswith("models:/") for m in models):
        from r2d.runtime import use_tracking

        use_tracking(cfg.tracking.uri)  # logging or not, a registry source is the config's registry's
    targets = make_targets(cfg, list(models), prompt_only_baseline)
    # 2. contamination, before any generation is paid for
    allow = cfg.eval.allow_contamination if allow_contamination is None else allow_contamination
    traces = traces or cfg.eval.traces or cfg.distill.output_dir
    contamination = contamination_report(loaded, traces, cfg.eval.contamination_threshold, allow)
    held_out = contamination["clean"] if contamination["checked"] else None
    versions = _pin_versions(targets) if log_mlflow else {}
    # 3. generate, judge, score (or reuse an earlier evaluation of the same inputs)
    results: dict[str, dict[str, Any]] = {}
    for target in targets:
        key = eval_key(cfg, target, digest)
        entry = find_reusable(cfg, key) if reuse and log_mlflow else None
        if entry is None:
            init_ray(cfg.resources.num_cpus)
            entry = run_target(rows, target, cfg)
            entry["general"] = (general_ability(target.source, cfg) if not target.baseline_of else
                                {"status": "skipped", "reason": f"R2D-p shares the weights of {target.baseline_of}"})
        entry.update(model_uri=target.source, model_version=versions.get(target.name, ""), suite_digest=digest,
                     held_out=held_out, eval_key=key,
                     contamination={k: contamination.get(k) for k in ("checked", "exact", "near", "traces")})
        results[target.name] = entry
    # 4. report
    from r2d.run_tags import git_commit

    meta = {"suite_digest": digest, "created_at": time.strftime("%Y-%m-%d %H:%M:%S"), "config_digest": cfg.digest(),
            "git_commit": git_commit(), "contamination": contamination, "judge_quality": keyword_judge_quality(),
            "trained_attacks": trained_attacks(traces),
            "suites": [{"name": s.name, "source": s.source, "n_harmful": s.n_harmful, "n_benign": s.n_benign,
                        "skipped": s.skipped, "ood": s.ood} for s in loaded]}
    folder = st.absolute(out_dir or st.join(cfg.eval.output_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{digest[:8]}"))
    # Reports are drawn on local disk (matplotlib writes files), then go where the config says.
    with tempfile.TemporaryDirectory(prefix="r2d-eval-") as tmp:
        paths = write_report(results, folder if st.is_local(folder) else tmp, meta)
        if log_mlflow and not all(e.get("reused") for e in results.values()):
            _log_mlflow(cfg, results, paths, meta)
        if not st.is_local(folder):
            st.copy_tree(tmp, folder)
    final = output_json(results)
    for entry in final.values():
        entry["report"] = st.join(folder, "report.md")
    if output:
        st.write_text(st.absolute(output) if "://" in output else output, json.dumps(final, indent=2) + "\n")
    return final
