"""General ability through EleutherAI's ``lm-eval``, when it can run.

Safety training that makes a model refuse more can also make it worse at
everything else; the promotion gates compare an ``ability`` number when both
models have one. ``lm-eval`` is optional: when it is not installed, no task is
configured, the model is an HTTP endpoint, or a task's data cannot be reached
(offline machines), the result is an explicit ``{"status": "skipped", "reason": ...}``
that the report prints, never a silent absence.
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["general_ability"]

# Metrics lm-eval reports per task, in order of preference.
_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def _task_score(task_result: dict[str, Any]) -> tuple[str, float] | None:
    for metric in _METRICS:
        value = task_result.get(metric)
        if isinstance(value, (int, float)):
            return metric.split(",")[0], float(value)
    return None


def general_ability(source: str, cfg, run=None) -> dict[str, Any]:
    """Score ``source`` on ``cfg.eval.general_tasks`` with lm-eval, or say why not.

    Args:
        source: The evaluated model (folder, bundled name, registry URI or endpoint).
        cfg: The job config (``eval.general_tasks``, ``eval.general_limit``, ``model``).
        run: Injected ``lm_eval.simple_evaluate`` (tests); None imports lm-eval.

    Returns:
        ``{"status": "ok", "ability": mean score, "tasks": {task: {"metric", "value"}}}``
        or ``{"status": "skipped", "reason": str}``.
    """
    if not cfg.eval.general_tasks:
        return _skipped("no lm-eval tasks configured (set eval.general_tasks, e.g. [arc_easy])")
    if source.startswith(("http://", "https://")):
        return _skipped("general ability needs local weights; the model is an HTTP endpoint")
    if run is None:
        if importlib.util.find_spec("lm_eval") is None:
            return _skipped("lm-eval is not installed (pip install lm-eval)")
        from lm_eval import simple_evaluate as run
    from r2d.models import ModelSourceError, resolve_source

    try:
        local = resolve_source(source, cfg.model.cache_dir, cfg.model.offline)
        out = run(model="hf", model_args=f"pretrained={local},dtype={cfg.model.dtype}",
                  tasks=list(cfg.eval.general_tasks), limit=cfg.eval.general_limit or None)
    except ModelSourceError as err:
        return _skipped(f"model not loadable for lm-eval: {err}")
    except Exception as err:  # lm-eval raises many types when a dataset is unreachable offline
        return _skipped(f"lm-eval failed ({type(err).__name__}: {str(err)[:200]}); task data may be unreachable")
    tasks = {}
    for task, task_result in (out or {}).get("results", {}).items():
        found = _task_score(task_result)
        if found:
            tasks[task] = {"metric": found[0], "value": found[1]}
    if not tasks:
        return _skipped("lm-eval returned no accuracy metric for the configured tasks")
    return {"status": "ok", "ability": sum(t["value"] for t in tasks.values()) / len(tasks), "tasks": tasks}
