"""The benchmarks' demo-like traces: the demo's prompts through the repair path's own writer."""

from pathlib import Path

from r2d.config import load_config
from r2d.distill import store
from r2d.refusal import is_refusal
from r2d.train.synthetic import demo_like_rows

ROOT = Path(__file__).resolve().parents[2]


def test_demo_like_rows_have_the_trace_schema_and_the_written_reasoning():
    rows = demo_like_rows(load_config(ROOT / "jobs/configs/tiny.yaml"), 40)
    assert len(rows) == 40 and {r["label"] for r in rows} == {"harmful", "benign"}
    store.to_table([{**r, "created_at": store.now()} for r in rows])  # every column of the store, right types
    for row in rows:
        assert len(row["reasoning_steps"]) == len(row["step_pivots"]) >= 2
        assert row["origin"] in ("annotation", "repaired")
        assert is_refusal(row["answer"]) == (row["label"] == "harmful"), row["answer"]
