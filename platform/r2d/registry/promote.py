"""Promotion: gate a candidate model version against the champion and move the alias.

The flow (``jobs/promote.py``, ``r2d promote``):

1. Resolve the candidate (``models:/r2d@challenger``) and the current ``champion``, if any.
2. Find both evaluations on the same suites: a version tagged ``r2d.eval_run.<suite digest>``
   reuses that evaluation run, provided the run itself says it evaluated this very version
   of this model on this suite digest with the configured judge; otherwise the evaluation
   runner scores it now. With no champion, the base model the candidate was trained from
   (its ``r2d.base_model`` tag) is found or evaluated the same way: a first champion must
   beat it.
3. :func:`r2d.registry.gates.decide` applies the gates from ``cfg.gates``.
4. Record the decision, the numbers and the reason as tags on the candidate version, always
   (except in a dry run); on a pass, move ``champion`` and append to the registered model's
   ``r2d.champion_history`` so that :func:`rollback` can move it back.

A candidate that already is the champion is an outcome (``already_champion``, exit 0), not
an error: re-running a pipeline must not fail at its last step.

A dry run changes nothing anywhere: it neither evaluates nor writes tags or aliases, so a
missing evaluation shows up as partial data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from r2d import run_tags as T
from r2d.registry.gates import Decision, decide, gate_numbers, summary_from_metrics
from r2d.tracking import TrackingError, alias_version, connect, get_registered_model, resolve_version

CHAMPION = "champion"
_HISTORY_LIMIT = 100


class PromotionError(TrackingError):
    """Promotion cannot proceed: nothing to roll back, an evaluation failed, or a race."""


@dataclass
class Evaluation:
    """One model version's evaluation on a suite: where it came from and its gate summary."""

    version: str
    run_id: str
    summary: dict[str, Any]
    reused: bool


@dataclass
class PromotionResult:
    """What :func:`promote` decided and did."""

    name: str
    candidate_version: str
    champion_version: str | None
    suite_digest: str | None
    decision: Decision
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    acted: bool = False
    notes: list[str] = field(default_factory=list)
    outcome: str = ""
    """promoted | rejected | already_champion (set by :func:`promote`)."""

    @property
    def is_champion(self) -> bool:
        """The candidate holds ``champion`` now (promoted here, or already before)."""
        return self.outcome in ("promoted", "already_champion")

    def report(self) -> str:
        """A short human-readable report."""
        if self.outcome == "already_champion":
            return f"ALREADY CHAMPION: {self.name} v{self.candidate_version} already is the {CHAMPION}; nothing to do"
        champ = f"v{self.champion_version}" if self.champion_version else "none"
        lines = [f"candidate {self.name} v{self.candidate_version} vs champion {champ} "
                 f"(suite digest {self.suite_digest or 'unknown'})"]
        for role, ev in sorted(self.evaluations.items()):
            how = "reused" if ev.reused else "evaluated now"
            what = ev.version if role == "base" else f"v{ev.version}"
            lines.append(f"  {role}: {what} evaluation run {ev.run_id} ({how})")
        for gate in self.decision.gates:
            lines.append(f"  [{'PASS' if gate.passed else 'FAIL'}] {gate.detail}")
        lines += [f"  note: {n}" for n in self.notes]
        verb = "PROMOTED" if self.decision.promoted else "NOT PROMOTED"
        suffix = "" if self.acted else " (dry run: nothing changed)"
        lines.append(f"{verb}: {self.decision.reason}{suffix}")
        return "\n".join(lines)


# ---------------------------------------------------------------- evaluations

def suite_digest_for(cfg) -> str:
    """The digest of the evaluation suites ``cfg.eval.suites`` resolves to."""
    from r2d.eval.suites import load_suites, suite_digest

    return suite_digest(load_suites(cfg.eval.suites, cfg))


def find_evaluation(client, version, digest: str, ability_key: str = "", judge: str | None = None,
                    code: str | None = None) -> Evaluation | None:
    """Reuse the evaluation run a version is tagged with for ``digest``, if that run really is its evaluation.

    A tag is only a pointer: the run it names must still exist and its own tags must name
    this registered model, this version and this suite digest (and ``judge`` and the evaluation
    code's digest ``code``, when given: numbers from a judge since fixed are not reused).
    Anything else (a run of another version, of other suites, a deleted run) is no evaluation.
    """
    from mlflow.exceptions import MlflowException

    from r2d.tracking import parse_model_uri

    run_id = (version.tags or {}).get(T.EVAL_RUN_PREFIX + digest)
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    tags = run.data.tags or {}
    try:
        name = tags.get(T.MODEL_NAME) or parse_model_uri(tags.get(T.MODEL_URI, "")).name
    except TrackingError:
        name = ""
    if (run.info.lifecycle_stage == "deleted" or tags.get(T.STAGE) != "eval" or name != version.name
            or tags.get(T.MODEL_VERSION) != str(version.version) or tags.get(T.SUITE_DIGEST) != digest
            or (judge is not None and tags.get(T.JUDGE) != judge)
            or (code is not None and tags.get(T.EVAL_CODE) != code)):
        return None
    return Evaluation(str(version.version), run_id, summary_from_metrics(run.data.metrics, ability_key), True)


def base_source(cfg, candidate) -> str:
    """The model the candidate was trained from: its ``r2d.base_model`` tag, else ``model.source``."""
    return (candidate.tags or {}).get(T.BASE_MODEL) or cfg.model.source


def base_evaluation(cfg, client, source: str, digest: str | None, evaluate: bool,
                    evaluate_fn: Callable | None = None) -> Evaluation | None:
    """The base model's evaluation on the suite: an earlier one with the same inputs, or a new one."""
    import dataclasses

    from r2d.eval.evaluate import eval_key, find_reusable
    from r2d.eval.runner import make_targets

    if not digest:
        return None
    base_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, source=source))
    target = make_targets(base_cfg, [source])[0]
    entry = find_reusable(cfg, eval_key(base_cfg, target, digest))
    if entry is None and evaluate:
        entry = (evaluate_fn or _evaluate_source)(base_cfg, source, digest)
    if entry is None:
        return None
    metrics = client.get_run(entry["run_id"]).data.metrics
    return Evaluation(source, entry["run_id"], summary_from_metrics(metrics, cfg.gates.ability_metric),
                      bool(entry.get("reused")))


def _evaluate_source(cfg, source: str, digest: str) -> dict:
    from r2d.eval.contamination import ContaminationError
    from r2d.eval.evaluate import evaluate_models
    from r2d.eval.suites import SuiteError
    from r2d.models import ModelSourceError

    try:
        entry = evaluate_models(cfg, [source], cfg.eval.suites)[source]
    except (ContaminationError, SuiteError, ModelSourceError) as err:
        raise PromotionError(f"evaluation of the base model {source} failed, nothing promoted: {err}") from None
    if entry.get("suite_digest") != digest or not entry.get("run_id"):
        raise PromotionError(f"the base model {source} was evaluated on suite digest {entry.get('suite_digest')}, "
                             f"expected {digest}; nothing promoted")
    return entry


def shared_digest(client, versions: list) -> str | None:
    """The newest suite digest every version has an evaluation for (used when suites cannot be loaded)."""
    common = None
    for mv in versions:
        digests = {k[len(T.EVAL_RUN_PREFIX):] for k in (mv.tags or {}) if k.startswith(T.EVAL_RUN_PREFIX)}
        common = digests if common is None else common & digests
    if not common:
        return None
    first = versions[0]

    def started(digest: str) -> int:
        try:
            return client.get_run(first.tags[T.EVAL_RUN_PREFIX + digest]).info.start_time or 0
        except Exception:
            return 0

    return max(sorted(common), key=started)


def _evaluate_now(cfg, client, name: str, versions: dict[str, Any], digest: str | None) -> dict[str, Evaluation]:
    """Score versions with the evaluation runner, then read the numbers back from its runs.

    Reading the logged metrics (not the returned dict) gives fresh and reused evaluations
    one code path, so the gates cannot see different numbers for the same evaluation.
    """
    from r2d.eval.contamination import ContaminationError
    from r2d.eval.evaluate import evaluate_models
    from r2d.eval.suites import SuiteError
    from r2d.models import ModelSourceError

    # Pinned versions, not aliases: a moving alias cannot swap weights mid-evaluation.
    uris = {role: f"models:/{name}/{mv.version}" for role, mv in versions.items()}
    try:
        results = evaluate_models(cfg, list(uris.values()), cfg.eval.suites)
    except (ContaminationError, SuiteError, ModelSourceError) as err:
        raise PromotionError(f"evaluation of {', '.join(uris.values())} failed, nothing promoted: {err}") from None
    out = {}
    for role, uri in uris.items():
        run_id = (results.get(uri) or {}).get("run_id")
        if not run_id:
            raise PromotionError(f"the evaluation runner logged no MLflow run for {uri}; nothing promoted")
        if digest and results[uri].get("suite_digest") not in (None, digest):
            raise PromotionError(f"{uri} was evaluated on suite digest {results[uri]['suite_digest']}, "
                                 f"expected {digest}; nothing promoted")
        metrics = client.get_run(run_id).data.metrics
        out[role] = Evaluation(str(versions[role].version), run_id,
                               summary_from_metrics(metrics, cfg.gates.ability_metric), False)
    return out


def gather_evaluations(cfg, client, name: str, versions: dict[str, Any], digest: str | None,
                       evaluate: bool, evaluate_fn: Callable | None = None) -> dict[str, Evaluation]:
    """Reuse or produce an evaluation for each role ("candidate", "champion") on the same suite."""
    from r2d.eval.evaluate import eval_code

    ability, code = cfg.gates.ability_metric, eval_code()
    found = {role: find_evaluation(client, mv, digest, ability, cfg.eval.judge, code) if digest else None
             for role, mv in versions.items()}
    todo = {role: versions[role] for role, ev in found.items() if ev is None}
    if todo and evaluate:
        found.update((evaluate_fn or _evaluate_now)(cfg, client, name, todo, digest))
    return {role: ev for role, ev in found.items() if ev is not None}


# ---------------------------------------------------------------- history and tags

def read_history(client, name: str) -> list[str]:
    """Versions that held ``champion``, oldest first (the registered model's history tag)."""
    model = get_registered_model(client, name)
    raw = (model.tags or {}).get(T.CHAMPION_HISTORY)
    if not raw:
        return []
    try:
        history = json.loads(raw)
    except ValueError:
        raise PromotionError(f"registered model {name!r}: tag {T.CHAMPION_HISTORY} is not a JSON list: "
                             f"{raw!r}") from None
    return [str(v) for v in history]


def _write_history(client, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, T.CHAMPION_HISTORY, json.dumps(history[-_HISTORY_LIMIT:]))


def _record(client, name: str, version: str, decision: str, reason: str, numbers: dict) -> None:
    client.set_model_version_tag(name, version, T.DECISION, decision)
    client.set_model_version_tag(name, version, T.REASON, reason)
    client.set_model_version_tag(name, version, T.NUMBERS, json.dumps(numbers, sort_keys=True, default=str))


# ---------------------------------------------------------------- promote and roll back

def promote(cfg, client, candidate_uri: str, dry_run: bool = False, evaluate: bool = True,
            suite_digest: str | None = None, evaluate_fn: Callable | None = None,
            base_evaluate_fn: Callable | None = None) -> PromotionResult:
    """Gate ``candidate_uri`` against the champion; on a pass move ``champion``.

    Args:
        cfg: the platform config (``gates``, ``eval``, ``tracking`` are used).
        client: an ``MlflowClient`` (see :func:`r2d.tracking.connect`).
        candidate_uri: ``models:/name@alias`` or ``models:/name/version``.
        dry_run: decide and report only: no evaluation, no tags, no alias moves.
        evaluate: score versions that lack a reusable evaluation (else: partial data).
        suite_digest: the suite digest to look up; None computes it from ``cfg.eval.suites``.
        evaluate_fn: replaces the evaluation runner (same signature as ``_evaluate_now``).
        base_evaluate_fn: replaces the base model's evaluation (same signature as ``_evaluate_source``).

    Returns:
        The result; ``outcome`` is ``already_champion`` when the candidate holds the alias already.

    Raises:
        TrackingError: unknown model, alias or version, or an unreachable store.
        PromotionError: an evaluation failed, or the champion moved meanwhile.
    """
    candidate = resolve_version(client, candidate_uri)
    name, cand_v = candidate.name, str(candidate.version)
    champ_v = alias_version(client, name, CHAMPION)
    if champ_v == cand_v:
        decision = Decision(False, f"{candidate_uri} is version {cand_v}, which already is the {CHAMPION}")
        return PromotionResult(name, cand_v, champ_v, None, decision, acted=False, outcome="already_champion")
    versions = {"candidate": candidate}
    if champ_v:
        versions["champion"] = client.get_model_version(name, champ_v)
    notes: list[str] = []
    digest = suite_digest or _digest_or_note(cfg, client, list(versions.values()), notes)
    run_evaluations = evaluate and not dry_run
    evals = gather_evaluations(cfg, client, name, versions, digest, run_evaluations, evaluate_fn)
    for role in versions:
        if role not in evals:
            notes.append(f"{role} v{versions[role].version} has no evaluation for suite digest {digest}")
    base = None
    if not champ_v:
        source = base_source(cfg, candidate)
        base = base_evaluation(cfg, client, source, digest, run_evaluations, base_evaluate_fn)
        if base is None:
            notes.append(f"the base model {source} has no evaluation for suite digest {digest}")
        else:
            evals["base"] = base
    champion_summary = evals["champion"].summary if "champion" in evals else ({} if champ_v else None)
    decision = decide(evals["candidate"].summary if "candidate" in evals else None, champion_summary,
                      cfg.gates, cfg.gates.ability_metric, base.summary if base else None)
    outcome = "promoted" if decision.promoted else "rejected"
    result = PromotionResult(name, cand_v, champ_v, digest, decision, evals, acted=not dry_run, notes=notes,
                             outcome=outcome)
    if dry_run:
        return result
    numbers = gate_numbers(decision, cfg.gates.ability_metric)
    numbers.update(champion_version=champ_v, suite_digest=digest, decided_at=int(time.time()),
                   eval_runs={role: ev.run_id for role, ev in evals.items()})
    if decision.promoted:
        _move_champion(client, name, cand_v, champ_v)
    _record(client, name, cand_v, outcome, decision.reason, numbers)
    return result


def _digest_or_note(cfg, client, versions: list, notes: list[str]) -> str | None:
    try:
        return suite_digest_for(cfg)
    except Exception as err:  # suites need data packages; the tags may still pair the runs
        digest = shared_digest(client, versions)
        notes.append(f"could not load eval suites ({type(err).__name__}: {err}); "
                     f"using the newest shared evaluation digest {digest}")
        return digest


def _move_champion(client, name: str, new: str, expected_old: str | None) -> None:
    """Move the alias, refusing when another promotion moved it since we decided."""
    current = alias_version(client, name, CHAMPION)
    if current != expected_old:
        raise PromotionError(f"{CHAMPION} of {name!r} moved from v{expected_old} to v{current} during "
                             "promotion; nothing promoted, re-run to decide against the new champion")
    history = read_history(client, name)
    if expected_old and (not history or history[-1] != expected_old):
        history.append(expected_old)  # a champion set by hand still becomes a rollback target
    client.set_registered_model_alias(name, CHAMPION, new)
    _write_history(client, name, history + [new])


def rollback(cfg, client, name: str | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Move ``champion`` back to the version that held it before the current one.

    Returns:
        ``{"name", "from_version", "to_version", "acted"}``.

    Raises:
        PromotionError: no champion, or no earlier champion in the history.
    """
    name = name or cfg.tracking.registered_model
    current = alias_version(client, name, CHAMPION)
    history = read_history(client, name)
    if current is None:
        raise PromotionError(f"registered model {name!r} has no {CHAMPION} alias; nothing to roll back")
    if current in history:
        history = history[:len(history) - history[::-1].index(current)]
    earlier = history[:-1] if history and history[-1] == current else history
    if not earlier:
        raise PromotionError(f"registered model {name!r}: {CHAMPION} v{current} has no earlier champion in "
                             f"{T.CHAMPION_HISTORY}; nothing to roll back to")
    target = earlier[-1]
    out = {"name": name, "from_version": current, "to_version": target, "acted": not dry_run}
    if dry_run:
        return out
    client.set_registered_model_alias(name, CHAMPION, target)
    _write_history(client, name, earlier)
    reason = f"rolled back: {CHAMPION} returned from v{current} to v{target}"
    numbers = {"from_version": current, "to_version": target, "decided_at": int(time.time())}
    _record(client, name, current, "rolled_back", reason, numbers)
    return out


def run_promotion(cfg, candidate: str, dry_run: bool = False, roll_back: bool = False, reuse_only: bool = False,
                  suite_digest: str | None = None) -> tuple[int, str]:
    """Promote or roll back; return (exit code, report). Shared by ``r2d promote`` and jobs/promote.py."""
    client = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
    if roll_back:
        out = rollback(cfg, client, cfg.tracking.registered_model, dry_run=dry_run)
        verb = "rolled back" if out["acted"] else "would roll back (dry run)"
        return 0, f"{verb}: {out['name']} champion v{out['from_version']} -> v{out['to_version']}"
    result = promote(cfg, client, candidate, dry_run=dry_run, evaluate=not reuse_only, suite_digest=suite_digest)
    return (0 if result.is_champion else 1), result.report()
