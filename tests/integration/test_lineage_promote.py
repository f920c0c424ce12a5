"""Lineage and promotion against the local sqlite MLflow, with real runs and model versions.

The chain is built from real MLflow objects: a distillation run (tags + prompt dataset input),
training runs (traces dataset input, tags, the tiny model folder as ``model/`` artifacts) and
registered versions created from those artifacts. Evaluation runs are real runs whose metrics
are logged here; the promotion gates read them back exactly as they would read the runner's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from registry_chain import SOURCES, base_evaluation, distill, evaluation, train

from r2d import run_tags as T
from r2d.config import load_config
from r2d.registry.lineage import format_back, trace_back, trace_forward
from r2d.registry.promote import PromotionError, promote, read_history, rollback
from r2d.tracking import TrackingError, connect, resolve_version

pytestmark = pytest.mark.integration

NAME = "r2d-lineage-it"  # private to this module: other tests share the session's registry
SUITE = "suite0123456789ab"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(state_dir, tiny_model_dir, tmp_path_factory):
    """v1, v2 trained on traces A; v3 on traces B; v4 shares v3's weights and has no evaluation."""
    from r2d.runtime import init_mlflow

    mlflow = init_mlflow("r2d-lineage-it")
    client = connect()
    exp_id = mlflow.get_experiment_by_name("r2d-lineage-it").experiment_id
    client.create_registered_model(NAME)
    tmp = tmp_path_factory.mktemp("lineage")
    distill_a, traces_a = distill(mlflow, exp_id, tmp, "aaaa1111bbbb2222")
    distill_b, traces_b = distill(mlflow, exp_id, tmp, "cccc3333dddd4444")
    train_1, v1 = train(mlflow, client, exp_id, tiny_model_dir, traces_a, NAME)
    train_2, v2 = train(mlflow, client, exp_id, tiny_model_dir, traces_a, NAME)
    train_3, v3 = train(mlflow, client, exp_id, tiny_model_dir, traces_b, NAME)
    v4 = str(client.create_model_version(NAME, source=client.get_model_version(NAME, v3).source,
                                         run_id=train_3).version)
    base = dict(asr=0.30, asr_none=0.20, asr_base64=0.40, over_refusal=0.30, discrimination=0.40)
    better = {**base, "asr": 0.20, "asr_base64": 0.20, "discrimination": 0.55}
    # v3 rises on base64 by 0.20 against v2: fails the ASR gate by 0.18.
    worse = {**better, "asr": 0.21, "asr_base64": 0.40}
    evals = {v: evaluation(mlflow, client, exp_id, NAME, v, SUITE, **m)
             for v, m in ((v1, base), (v2, better), (v3, worse))}
    return {"client": client, "v": [v1, v2, v3, v4], "evals": evals, "distill_a": distill_a,
            "train": [train_1, train_2, train_3], "digest_a": "aaaa1111bbbb2222"}


@pytest.fixture()
def cfg():
    # The fixture's numbers sit above the default ASR ceilings; these tests are about the flow.
    return load_config(ROOT / "jobs/configs/tiny.yaml", [f"tracking.registered_model={NAME}", "gates.max_asr=0.5",
                                                         "gates.max_attack_asr=0.5"])


def test_promote_reject_and_roll_back(registry, cfg):
    client, (v1, v2, v3, v4) = registry["client"], registry["v"]
    # No champion yet: without the base model's evaluation nothing is promoted...
    blind = promote(cfg, client, f"models:/{NAME}/{v1}", suite_digest=SUITE, evaluate=False, dry_run=True)
    assert not blind.decision.promoted and blind.decision.missing == ["base evaluation"]
    # ...and the base model it was trained from (its r2d.base_model tag) must be beaten.
    base_run = base_evaluation(cfg, "tiny-llama", SUITE, asr=0.9, asr_none=0.9, asr_base64=0.9, over_refusal=0.0,
                               discrimination=0.05)
    first = promote(cfg, client, f"models:/{NAME}/{v1}", suite_digest=SUITE, evaluate=False)
    assert first.decision.promoted and first.champion_version is None, first.decision.reason
    assert first.evaluations["base"].run_id == base_run and first.evaluations["base"].reused
    assert {"asr_vs_base", "discrimination_vs_base"} <= {g.name for g in first.decision.gates}
    assert str(resolve_version(client, f"models:/{NAME}@champion").version) == v1
    # A better candidate, given as an alias, reuses both evaluation runs.
    client.set_registered_model_alias(NAME, "challenger", v2)
    second = promote(cfg, client, f"models:/{NAME}@challenger", suite_digest=SUITE, evaluate=False)
    assert second.decision.promoted, second.decision.reason
    assert {r: e.run_id for r, e in second.evaluations.items()} == {"candidate": registry["evals"][v2],
                                                                     "champion": registry["evals"][v1]}
    assert str(resolve_version(client, f"models:/{NAME}@champion").version) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags[T.DECISION] == "promoted"
    numbers = json.loads(tags[T.NUMBERS])
    assert numbers["champion_version"] == v1 and numbers["candidate"]["asr_by_attack"]["base64"] == 0.20
    assert numbers["eval_runs"]["champion"] == registry["evals"][v1]
    assert read_history(client, NAME) == [v1, v2]

    # A dry run decides but writes nothing.
    dry = promote(cfg, client, f"models:/{NAME}/{v3}", suite_digest=SUITE, dry_run=True)
    assert not dry.decision.promoted and not dry.acted
    assert T.DECISION not in client.get_model_version(NAME, v3).tags

    # A worse candidate is refused, and the reason names the gate and the amount.
    third = promote(cfg, client, f"models:/{NAME}/{v3}", suite_digest=SUITE, evaluate=False)
    assert not third.decision.promoted
    assert [g.name for g in third.decision.failed] == ["asr[base64]"]
    tags = client.get_model_version(NAME, v3).tags
    assert tags[T.DECISION] == "rejected"
    assert "asr[base64] rose by +0.200 (0.200 -> 0.400); exceeds by 0.180 tolerance 0.020" in tags[T.REASON]
    assert str(resolve_version(client, f"models:/{NAME}@champion").version) == v2

    # An evaluation tag that points at another version's run is no evaluation of this one.
    client.set_model_version_tag(NAME, v4, T.EVAL_RUN_PREFIX + SUITE, registry["evals"][v3])
    # No evaluation and no evaluating: partial data, never promoted, still recorded.
    fourth = promote(cfg, client, f"models:/{NAME}/{v4}", suite_digest=SUITE, evaluate=False)
    assert not fourth.decision.promoted and "candidate evaluation" in fourth.decision.missing
    assert client.get_model_version(NAME, v4).tags[T.REASON].startswith("not promoted on partial data: missing "
                                                                        "candidate evaluation")
    assert str(resolve_version(client, f"models:/{NAME}@champion").version) == v2

    # Promoting the champion itself is an outcome, not an error: nothing changes.
    tags_before = dict(client.get_model_version(NAME, v2).tags)
    again = promote(cfg, client, f"models:/{NAME}@champion", suite_digest=SUITE, evaluate=False)
    assert again.outcome == "already_champion" and again.is_champion and not again.acted
    assert again.report().startswith(f"ALREADY CHAMPION: {NAME} v{v2} already is the champion")
    assert dict(client.get_model_version(NAME, v2).tags) == tags_before

    # Roll back: champion returns to v1, the demoted version says why.
    out = rollback(cfg, client, NAME)
    assert out == {"name": NAME, "from_version": v2, "to_version": v1, "acted": True}
    assert str(resolve_version(client, f"models:/{NAME}@champion").version) == v1
    assert read_history(client, NAME) == [v1]
    assert client.get_model_version(NAME, v2).tags[T.DECISION] == "rolled_back"
    with pytest.raises(PromotionError, match="no earlier champion"):
        rollback(cfg, client, NAME)


def test_lineage_from_champion_back_to_prompts(registry, capsys):
    from r2d.cli import main

    client, v2 = registry["client"], registry["v"][1]
    client.set_registered_model_alias(NAME, "champion", v2)
    chain = trace_back(client, f"models:/{NAME}@champion")
    assert chain["missing"] == []
    assert chain["model"]["version"] == v2 and "champion" in chain["model"]["aliases"]
    assert chain["train_run"]["run_id"] == registry["train"][1]
    assert chain["train_run"]["datasets"][0]["digest"] == registry["digest_a"]
    assert chain["train_run"]["config_artifacts"] == ["config.json"]
    assert chain["traces"]["digest"] == registry["digest_a"]
    assert chain["distill_run"]["run_id"] == registry["distill_a"]
    assert chain["distill_run"]["prompt_sources"] == SOURCES
    assert chain["evaluations"][0]["metrics"]["discrimination"] == pytest.approx(0.55)

    assert main(["lineage", f"models:/{NAME}@champion"]) == 0
    text = capsys.readouterr().out
    assert text == format_back(chain) + "\n"
    for needle in (f"{NAME} version {v2}", "teacher    bundled:smollm2-135m", "tagger     rules",
                   "system prompt r2d-safety-v1", "prompts      harmbench(split=all, limit=8), benign(limit=8)",
                   f"distill run  {registry['distill_a']}"):
        assert needle in text


def test_lineage_forward_from_traces_digest(registry):
    client, (v1, v2, v3, _v4) = registry["client"], registry["v"]
    client.set_registered_model_alias(NAME, "champion", v2)
    found = trace_forward(client, registry["digest_a"])
    assert [v["version"] for v in found["model_versions"]] == [v1, v2]
    assert "champion" in found["model_versions"][1]["aliases"]
    assert [r["run_id"] for r in found["train_runs"]] == registry["train"][:2]
    assert [r["run_id"] for r in found["distill_runs"]] == [registry["distill_a"]]
    assert trace_forward(client, registry["digest_a"][:8])["model_versions"] == found["model_versions"]
    with pytest.raises(TrackingError, match="expected at least 8 hex characters"):
        trace_forward(client, "aaaa")
    other = trace_forward(client, "cccc3333dddd4444")
    assert {v["version"] for v in other["model_versions"]} == {registry["v"][2], registry["v"][3]}


def test_bad_model_uris_name_what_is_missing(registry, capsys):
    from r2d.cli import main

    client = registry["client"]
    with pytest.raises(TrackingError, match="registered model 'no-such-model' does not exist"):
        resolve_version(client, "models:/no-such-model@champion")
    with pytest.raises(TrackingError, match=f"registered model '{NAME}' has no alias 'ghost' \\(aliases set: "):
        resolve_version(client, f"models:/{NAME}@ghost")
    with pytest.raises(TrackingError, match=f"registered model '{NAME}' has no version 999"):
        resolve_version(client, f"models:/{NAME}/999")
    with pytest.raises(TrackingError, match="expected models:/name@alias or models:/name/version"):
        resolve_version(client, "runs:/abc/model")
    assert main(["lineage", f"models:/{NAME}@ghost"]) == 2
    assert f"has no alias 'ghost'" in capsys.readouterr().err


def test_promote_job_dry_run_changes_nothing(registry):
    """The job itself, as a process: a dry-run decision for v3 against the champion, nothing written."""
    client, v3 = registry["client"], registry["v"][2]
    before_tags = dict(client.get_model_version(NAME, v3).tags)
    before_alias = client.get_registered_model(NAME).aliases
    proc = subprocess.run([sys.executable, "jobs/promote.py", "--config", "jobs/configs/tiny.yaml",
                           "--candidate", f"models:/{NAME}/{v3}", "--dry-run", "--suite-digest", SUITE,
                           f"tracking.registered_model={NAME}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    assert "dry run: nothing changed" in proc.stdout
    assert dict(client.get_model_version(NAME, v3).tags) == before_tags
    assert client.get_registered_model(NAME).aliases == before_alias
    missing = subprocess.run([sys.executable, "jobs/promote.py", "--candidate", "models:/no-such-model@challenger",
                              "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "registered model 'no-such-model' does not exist" in missing.stderr
