"""Traces schema, manifest counts, content digest and the resume rule (no Ray: files written directly)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from r2d import commits
from r2d import storage as st
from r2d.distill import store

ROOT = Path(__file__).resolve().parents[2]


def _row(pid, label="benign", pivots=("[SAFE]",), teacher=("",), repaired=False, answer="ok", origin="teacher"):
    return {"prompt_id": pid, "prompt": f"prompt {pid}", "source": "benign", "label": label, "attack": "none",
            "teacher": "bundled:smollm2-135m", "system_prompt_id": "r2d-safety-v1",
            "reasoning_steps": [f"step {i}" for i in range(len(pivots))], "step_pivots": list(pivots),
            "teacher_pivots": list(teacher), "answer": answer,
            "answer_pivot": "[UNSAFE]" if label == "harmful" else "[SAFE]", "tagger": "rules",
            "repaired": repaired, "n_tokens": 42, "created_at": datetime.now(timezone.utc), "origin": origin,
            "request": ""}


def _write(out, name, rows, drops=(), errors=()):
    store.commit_chunk(rows, list(drops), list(errors), str(out), name)


def test_schema_matches_the_design_contract():
    assert store.COLUMNS == ("prompt_id", "prompt", "source", "label", "attack", "teacher", "system_prompt_id",
                              "reasoning_steps", "step_pivots", "teacher_pivots", "answer", "answer_pivot",
                              "tagger", "repaired", "n_tokens", "created_at", "origin", "request")
    table = store.to_table([_row("a")])
    assert table.schema.equals(store.SCHEMA)
    assert table.schema.field("step_pivots").type == pa.list_(pa.string())
    with pytest.raises(KeyError):
        store.to_table([{k: v for k, v in _row("a").items() if k != "answer"}])


def test_manifest_counts_everything_written(tmp_path):
    _write(tmp_path, "1", [_row("a"), _row("b", "harmful", ("[UNSAFE]", "[RETHINK]"), ("[SAFE]", ""), True,
                                        origin="annotation")])
    _write(tmp_path, "2", [_row("c", pivots=("[SAFE]", "[SAFE]"), teacher=("", ""))],
           drops=[{"prompt_id": "d", "label": "benign", "reason": "too_long"}],
           errors=[{"prompt_id": "e", "error": "boom"}])
    m = store.manifest(tmp_path, {"distill": {"teacher": "x"}}, {"mlflow_run_id": "r1"})
    assert m["rows"] == 3 and m["by_label"] == {"benign": 2, "harmful": 1}
    assert m["step_pivots"] == {"[SAFE]": 3, "[UNSAFE]": 1, "[RETHINK]": 1}
    assert m["answer_pivots"] == {"[SAFE]": 2, "[UNSAFE]": 1}
    assert m["repaired"] == 1 and m["teacher_pivots_missing"] == 2
    assert m["by_origin"] == {"benign:teacher": 2, "harmful:annotation": 1}
    assert m["drops"] == {"too_long": 1} and m["errors"] == 1 and m["mlflow_run_id"] == "r1"
    assert m["config"] == {"distill": {"teacher": "x"}} and "pyarrow" in m["packages"]
    path = store.write_manifest(tmp_path, m)
    assert json.loads(Path(path).read_text())["digest"] == m["digest"] and store.read_manifest(tmp_path) == m


def test_digest_ignores_order_and_time_but_not_content(tmp_path):
    rows = [_row("a"), _row("b", "harmful", ("[UNSAFE]",))]
    later = [dict(r, created_at=datetime(2030, 1, 1, tzinfo=timezone.utc)) for r in reversed(rows)]
    assert store.digest(store.to_table(rows)) == store.digest(store.to_table(later))
    changed = [rows[0], dict(rows[1], answer="different")]
    assert store.digest(store.to_table(rows)) != store.digest(store.to_table(changed))


def test_resume_skips_written_and_dropped_but_retries_errors(tmp_path):
    prompts = [{"prompt_id": p, "prompt": p} for p in ("a", "b", "c", "d", "e")]
    assert store.pending(prompts, tmp_path) == prompts  # nothing written yet
    _write(tmp_path, "1", [_row("a"), _row("c")], drops=[{"prompt_id": "d", "reason": "too_long"}],
           errors=[{"prompt_id": "e", "error": "timeout"}])
    assert [p["prompt_id"] for p in store.pending(prompts, tmp_path)] == ["b", "e"]


def test_uncommitted_chunks_are_invisible(tmp_path):
    """Files a dead driver wrote without their marker are neither read nor skipped."""
    st.write_bytes(st.join(str(tmp_path), "data/chunk-9/part.parquet"), b"PAR1 half written")
    st.write_bytes(st.join(str(tmp_path), "drops/chunk-9.jsonl"), b'{"prompt_id": "a", "rea')
    assert store.read_table(tmp_path).num_rows == 0 and store.read_drops(tmp_path) == []
    assert store.pending([{"prompt_id": "a"}], tmp_path) == [{"prompt_id": "a"}]
    assert not store.exists(tmp_path)


def test_chunks_written_before_the_origin_column_still_read(tmp_path):
    """Traces from before ``origin`` existed resume and train: the column reads as null."""
    old = store.to_table([_row("a")]).drop_columns(["origin"])
    commits.commit_chunk(str(tmp_path), "chunk-old", {"data/chunk-old/part.parquet": old})
    table = store.read_table(tmp_path)
    assert table.schema.equals(store.SCHEMA) and table.column("origin").to_pylist() == [None]
    assert store.manifest(tmp_path, {})["by_origin"] == {"benign:unrecorded": 1}


def test_chunks_written_before_the_request_column_read_and_hash_as_before(tmp_path):
    """``request`` (the plain request inside a wrapped prompt) reads as null from older chunks, and an empty
    one leaves the content hash as it was, so a model trained on those traces is still found by it."""
    import hashlib

    old = store.to_table([_row("a")]).drop_columns(["request"])
    commits.commit_chunk(str(tmp_path), "chunk-old", {"data/chunk-old/part.parquet": old})
    table = store.read_table(tmp_path)
    assert table.column("request").to_pylist() == [None]
    before = [{k: v for k, v in r.items() if k != "created_at"} for r in old.to_pylist()]
    assert store.digest(table) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert store.digest(table) == store.digest(store.to_table([_row("a")]))
    assert store.digest(store.to_table([{**_row("a"), "request": "plain"}])) != store.digest(table)


_KILLED_WRITER = """
import os, sys, time
from datetime import datetime, timezone
from r2d import storage as st
from r2d.distill import store

out, ready = sys.argv[1], sys.argv[2]
row = dict(prompt_id="a", prompt="p", source="s", label="benign", attack="none", teacher="t",
           system_prompt_id="v1", reasoning_steps=["x"], step_pivots=["[SAFE]"], teacher_pivots=[""],
           answer="ok", answer_pivot="[SAFE]", tagger="rules", repaired=False, n_tokens=1,
           created_at=datetime.now(timezone.utc), origin="teacher", request="")
store.commit_chunk([row], [{"prompt_id": "b", "reason": "too_long"}], [], out, "r-00000")
real = st._local_write

def stalled(path, data):  # the second chunk's drop records: half of them on disk, then the process dies
    if path.endswith(".jsonl"):
        with open(os.path.join(os.path.dirname(path), ".tmp-inflight-" + os.path.basename(path)), "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        open(ready, "w").close()
        time.sleep(600)
    return real(path, data)

st._local_write = stalled
store.commit_chunk([dict(row, prompt_id="c")], [{"prompt_id": "d", "reason": "too_long"},
                                                  {"prompt_id": "e", "reason": "benign_refusal"}], [], out, "r-00001")
"""


def test_drop_records_survive_a_kill_mid_write(tmp_path):
    """SIGKILL while a chunk's drop records are half on disk: later reads neither fail nor see any of that chunk."""
    out, ready = tmp_path / "traces", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), str(out), str(ready)], env=env)
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert ready.exists(), "the writer never reached the second chunk"
    leftovers = [p.name for p in (out / "drops").iterdir()]
    assert any(name.startswith(".tmp-") for name in leftovers)  # the half-written bytes are really there
    assert store.read_drops(out) == [{"prompt_id": "b", "reason": "too_long"}]
    assert store.read_table(out, ["prompt_id"]).column("prompt_id").to_pylist() == ["a"]
    prompts = [{"prompt_id": p} for p in "abcde"]
    assert [p["prompt_id"] for p in store.pending(prompts, out)] == ["c", "d", "e"]
    assert store.manifest(out, {})["drops"] == {"too_long": 1}


def test_a_folder_of_traces_made_under_other_settings_is_refused(tmp_path):
    """Resuming into traces made under other trace-defining settings would mix two kinds of traces under a
    manifest naming one: it is refused, naming what differs. A manifest older than a setting holds its default."""
    from pipelines.distill import changed_settings, run
    from r2d.config import ConfigError, load_config

    cfg = load_config(None, [f"distill.output_dir={tmp_path}"])
    older = cfg.to_dict()
    del older["distill"]["analysis_order"]  # written before the setting existed
    assert changed_settings({"config": older}, cfg) == {}
    store.write_manifest(tmp_path, {"config": older, "rows": 1})
    other = load_config(None, [f"distill.output_dir={tmp_path}", "distill.sampling.max_tokens=64",
                               "distill.analysis_order=[request, intent, target, deciding]"])
    assert changed_settings({"config": older}, other) == {
        "sampling.max_tokens": (256, 64),
        "analysis_order": (["intent", "target", "deciding"], ["request", "intent", "target", "deciding"])}
    with pytest.raises(ConfigError, match=rf"^distill.output_dir: {tmp_path} holds traces made with other settings "
                                          r"\(sampling.max_tokens: 256 there, 64 here; analysis_order: "
                                          r"\['intent', 'target', 'deciding'\] there, "
                                          r"\['request', 'intent', 'target', 'deciding'\] here\)"):
        run(other)


def test_distilled_prompts_take_the_attacks_and_an_unknown_one_names_the_field(tmp_path):
    """``distill.attacks`` wraps a share of the balanced training prompts (both labels); the attacks are
    trace-defining settings, and an unknown one is a config error naming the field before any work."""
    from pipelines.distill import changed_settings, run, training_set
    from r2d.config import ConfigError, load_config

    keys = [f"distill.output_dir={tmp_path}", "distill.attack_fraction=0.25", "distill.refusals=intent"]
    plain = load_config(ROOT / "jobs/configs/tiny.yaml", [*keys, "distill.attacks=[]"])
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [*keys, "distill.attacks=[few_shot, roleplay_dan]"])
    before, after = training_set(plain), training_set(cfg)
    assert len(after) == len(before) == 300
    wrapped = [r for r in after if r["attack"] != "none"]
    assert {r["attack"] for r in wrapped} == {"few_shot", "roleplay_dan"}
    assert {r["label"] for r in wrapped} == {"harmful", "benign"} and 70 <= len(wrapped) <= 80
    assert {r["request"] for r in wrapped} <= {r["prompt"] for r in before}
    assert changed_settings({"config": plain.to_dict()}, cfg) == {"attacks": ([], ["few_shot", "roleplay_dan"])}
    generic = load_config(ROOT / "jobs/configs/tiny.yaml", [*keys, "distill.attacks=[]", "distill.refusals=generic"])
    assert changed_settings({"config": plain.to_dict()}, generic) == {"refusals": ("intent", "generic")}
    # tiny.yaml's own recipe: a tenth of the prompts in four attacks, the rest as they were.
    tiny = training_set(load_config(ROOT / "jobs/configs/tiny.yaml", [f"distill.output_dir={tmp_path}"]))
    tiny_wrapped = [r for r in tiny if r["attack"] != "none"]
    assert len(tiny) == 300 and 25 <= len(tiny_wrapped) <= 35
    assert {r["attack"] for r in tiny_wrapped} == {"roleplay_dan", "deep_inception", "few_shot", "refusal_suppression"}
    bad = load_config(None, [f"distill.output_dir={tmp_path}", "distill.attacks=[few_shots]"])
    with pytest.raises(ConfigError, match=r"^distill.attacks: unknown attack 'few_shots'; valid attacks: "):
        run(bad)
    with pytest.raises(ConfigError, match=r"distill.attack_fraction.*a fraction in \(0, 1\]"):
        load_config(None, ["distill.attack_fraction=0"])
