"""Traces schema, manifest counts, content digest and the resume rule (no Ray: files written directly)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2d.distill import store
def _row(pid, label="benign", pivots=("[SAFE]",), teacher=("",), repaired=False, answer="ok", origin="teacher"):
    return {"prompt_id": pid, "prompt": f"prompt {pid}", "source": "benign", "label": label, "attack": "none",
            "teacher": "bundled:smollm2-135m", "system_prompt_id": "r2d-safety-v1",
            "reasoning_steps": [f"step {i}" for i in range(len(pivots))], "step_pivots": list(pivots),
            "teacher_pivots": list(teacher), "answer": answer,
            "answer_pivot": "[UNSAFE]" if label == "harmful" else "[SAFE]", "tagger": "rules",
            "repaired": repaired, "n_tokens": 42, "created_at": datetime.now(timezone.utc), "origin": origin}


def _write(out, name, rows):
    folder = store.data_dir(out) / f"chunk-{name}"
    folder.mkdir(parents=True)
    pq.write_table(store.to_table(rows), folder / "part.parquet")


def test_schema_matches_the_design_contract():
    assert store.COLUMNS == ("prompt_id", "prompt", "source", "label", "attack", "teacher", "system_prompt_id",
                              "reasoning_steps", "step_pivots", "teacher_pivots", "answer", "answer_pivot",
                              "tagger", "repaired", "n_tokens", "created_at", "origin")
    table = store.to_table([_row("a")])
    assert table.schema.equals(store.SCHEMA)
    assert table.schema.field("step_pivots").type == pa.list_(pa.string())
    with pytest.raises(KeyError):
        store.to_table([{k: v for k, v in _row("a").items() if k != "answer"}])


def test_manifest_counts_everything_written(tmp_path):
    _write(tmp_path, "1", [_row("a"), _row("b", "harmful", ("[UNSAFE]", "[RETHINK]"), ("[SAFE]", ""), True,
                                        origin="annotation")])
    _write(tmp_path, "2", [_row("c", pivots=("[SAFE]", "[SAFE]"), teacher=("", ""))])
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "chunk-1.jsonl").write_text(
        json.dumps({"prompt_id": "d", "label": "benign", "reason": "too_long"}) + "\n")
    store.append_errors([{"prompt_id": "e", "error": "boom"}], tmp_path)
    m = store.manifest(tmp_path, {"distill": {"teacher": "x"}}, {"mlflow_run_id": "r1"})
    assert m["rows"] == 3 and m["by_label"] == {"benign": 2, "harmful": 1}
    assert m["step_pivots"] == {"[SAFE]": 3, "[UNSAFE]": 1, "[RETHINK]": 1}
    assert m["answer_pivots"] == {"[SAFE]": 2, "[UNSAFE]": 1}
    assert m["repaired"] == 1 and m["teacher_pivots_missing"] == 2
    assert m["by_origin"] == {"benign:teacher": 2, "harmful:annotation": 1}
    assert m["drops"] == {"too_long": 1} and m["errors"] == 1 and m["mlflow_run_id"] == "r1"
    assert m["config"] == {"distill": {"teacher": "x"}} and "pyarrow" in m["packages"]
    path = store.write_manifest(tmp_path, m)
    assert json.loads(path.read_text())["digest"] == m["digest"]


def test_digest_ignores_order_and_time_but_not_content(tmp_path):
    rows = [_row("a"), _row("b", "harmful", ("[UNSAFE]",))]
    later = [dict(r, created_at=datetime(2030, 1, 1, tzinfo=timezone.utc)) for r in reversed(rows)]
    assert store.digest(store.to_table(rows)) == store.digest(store.to_table(later))
    changed = [rows[0], dict(rows[1], answer="different")]
    assert store.digest(store.to_table(rows)) != store.digest(store.to_table(changed))


def test_resume_skips_written_and_dropped_but_retries_errors(tmp_path):
    prompts = [{"prompt_id": p, "prompt": p} for p in ("a", "b", "c", "d", "e")]
    assert store.pending(prompts, tmp_path) == prompts  # nothing written yet
    _write(tmp_path, "1", [_row("a"), _row("c")])
    (tmp_path / "drops").mkdir()
    (tmp_path / "drops" / "chunk-1.jsonl").write_text(json.dumps({"prompt_id": "d", "reason": "too_long"}) + "\n")
    store.append_errors([{"prompt_id": "e", "error": "timeout"}], tmp_path)
    assert [p["prompt_id"] for p in store.pending(prompts, tmp_path)] == ["b", "e"]


def test_unfinished_chunks_are_invisible(tmp_path):
    """A chunk still in _tmp/ (the job died while writing it) is neither read nor skipped."""
    tmp_chunk = tmp_path / "_tmp" / "chunk-9"
    tmp_chunk.mkdir(parents=True)
    pq.write_table(store.to_table([_row("a")]), tmp_chunk / "part.parquet")
    assert store.read_table(tmp_path).num_rows == 0
    assert store.pending([{"prompt_id": "a"}], tmp_path) == [{"prompt_id": "a"}]


def test_chunks_written_before_the_origin_column_still_read(tmp_path):
    """Traces from before ``origin`` existed resume and train: the column reads as null."""
    folder = store.data_dir(tmp_path) / "chunk-old"
    folder.mkdir(parents=True)
    old = store.to_table([_row("a")]).drop_columns(["origin"])
    pq.write_table(old, folder / "part.parquet")
    table = store.read_table(tmp_path)
    assert table.schema.equals(store.SCHEMA) and table.column("origin").to_pylist() == [None]
    assert store.manifest(tmp_path, {})["by_origin"] == {"benign:unrecorded": 1}
