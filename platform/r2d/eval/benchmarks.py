"""Readers for published safety benchmarks, each to rows of one small schema.

Every reader takes a path and returns rows, in the file's order::

    {"prompt": "...",          # what the model is sent
     "label": "harmful",       # harmful | benign
     "category": "homonyms",   # the benchmark's own type or category
     "source": "xstest:xstest_prompts",
     "attack": "none"}         # or the artifact's method, lower case: pair, gcg, jbc …

Rows that cannot be sent are skipped and counted in a
:class:`~r2d.data.prompts.LoadReport` (``empty_prompt``, ``null_prompt``,
``copyright``, ``bad_label``), never dropped in silence: a benchmark scored on
447 of its 450 prompts must say so. The facts each reader relies on (columns,
value sets, file names) are written down in ``tests/fixtures/benchmarks/FORMATS.md``.

:func:`load_benchmark` picks the reader from the file's columns or keys.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from r2d.data.prompts import LoadReport

BENCH_KEYS = ("prompt", "label", "category", "source", "attack")

XSTEST_LABELS = {"safe": "benign", "unsafe": "harmful"}
# OR-Bench ships no label column: the file says which side a prompt is on.
ORBENCH_LABELS = {"harmful": "harmful", "toxic": "harmful", "unsafe": "harmful",
                  "benign": "benign", "safe": "benign", "hard": "benign"}
HARMBENCH_SKIPPED = ("copyright",)
# An artifact's parameters.method, lower-cased, to the short attack name used in
# reports. The jailbreakchat artifacts sit in a JBC folder but say "JailbreakChat".
ARTIFACT_ATTACKS = {"pair": "pair", "gcg": "gcg", "jbc": "jbc", "jailbreakchat": "jbc",
                    "prompt_with_random_search": "random_search", "dsn": "dsn"}

# Columns each CSV format must have. Detection takes the first format whose
# columns are all present; OR-Bench's two are the most generic, so it comes last.
CSV_COLUMNS = {
    "xstest": ("prompt", "type", "label"),
    "harmbench": ("Behavior", "FunctionalCategory", "SemanticCategory"),
    "jbb_behaviors": ("Goal", "Behavior", "Category"),
    "orbench": ("prompt", "category"),
}
ARTIFACT_KEYS = ("parameters", "jailbreaks")


class BenchmarkFormatError(ValueError):
    """A benchmark file cannot be read: unknown layout, missing columns or keys, bad label."""


# ------------------------------------------------------------------ shared pieces


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    # utf-8-sig: a BOM from a spreadsheet export would otherwise rename the first column.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return [c for c in (reader.fieldnames or []) if c is not None], rows


def _require(path: Path, found: list[str] | tuple[str, ...], needed: tuple[str, ...], fmt: str) -> None:
    missing = [c for c in needed if c not in found]
    if missing:
        raise BenchmarkFormatError(
            f"{path}: not a {fmt} file: expected columns {list(needed)}, "
            f"missing {missing}; found {list(found)}")


def _row(prompt: str, label: str, category: str, source: str, attack: str = "none") -> dict[str, str]:
    return {"prompt": prompt, "label": label, "category": category, "source": source,
            "attack": attack}


def _add(rows: list[dict], report: LoadReport, prompt: Any, *fields: str) -> None:
    """Append a row unless the prompt is null or blank; count the skip otherwise."""
    if prompt is None:
        report.skip("null_prompt")
    elif not str(prompt).strip():
        report.skip("empty_prompt")
    else:
        rows.append(_row(str(prompt).strip(), *fields))


def _finish(rows: list[dict], report: LoadReport | None, source: str, read: int) -> list[dict]:
    report = report if report is not None else LoadReport()
    report.source = report.source or source
    report.read += read
    report.kept += len(rows)
    report.warn_if_skipped()
    return rows


def _label_from_name(path: Path, table: dict[str, str], fmt: str) -> str:
    # Whole words only: "unsafe" must not also read as "safe".
    words = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
    hits = {label for word, label in table.items() if word in words}
    if len(hits) != 1:
        raise BenchmarkFormatError(
            f"{path}: a {fmt} file without a label column must say its side in its name "
            f"(one of {sorted(table)}), or pass label=")
    return hits.pop()


# ------------------------------------------------------------------ one reader per format


def read_xstest(path: str | Path, report: LoadReport | None = None) -> list[dict]:
    """XSTest prompts (``id, prompt, type, label, focus, note``).

    ``label`` safe becomes benign and unsafe harmful; ``category`` is ``type``
    (``homonyms``, ``contrast_homonyms`` …). A row with another label is skipped
    as ``bad_label``.
    """
    path = Path(path)
    cols, records = _read_csv(path)
    _require(path, cols, CSV_COLUMNS["xstest"], "xstest")
    report = report if report is not None else LoadReport()
    rows: list[dict] = []
    for rec in records:
        label = XSTEST_LABELS.get((rec["label"] or "").strip().lower())
        if label is None:
            report.skip("bad_label")
            continue
        _add(rows, report, rec["prompt"], label, (rec["type"] or "").strip(), f"xstest:{path.stem}")
    return _finish(rows, report, f"xstest:{path.stem}", len(records))


def read_jbb_behaviors(path: str | Path, label: str | None = None,
                       report: LoadReport | None = None) -> list[dict]:
    """JBB-Behaviors (``Index, Goal, Target, Behavior, Category, Source``).

    The prompt is ``Goal``; ``category`` is ``Category``. The file has no label
    column: ``benign-behaviors.csv`` holds the benign twins and every other file
    (``harmful-behaviors.csv``, the package's ``behaviors.csv``) harmful ones,
    unless ``label`` says otherwise.
    """
    path = Path(path)
    cols, records = _read_csv(path)
    _require(path, cols, CSV_COLUMNS["jbb_behaviors"], "jbb_behaviors")
    side = label or ("benign" if "benign" in path.stem.lower() else "harmful")
    report = report if report is not None else LoadReport()
    rows: list[dict] = []
    for rec in records:
        _add(rows, report, rec["Goal"], side, (rec["Category"] or "").strip(), f"jbb:{side}")
    return _finish(rows, report, f"jbb:{side}", len(records))


def read_jbb_artifact(path: str | Path, report: LoadReport | None = None) -> list[dict]:
    """A JailbreakBench artifact: ``{"parameters": {...}, "jailbreaks": [...]}``.

    Each jailbreak's ``prompt`` is the attack text actually sent; it is null
    where the method found none, and such rows are skipped as ``null_prompt``.
    Every row is harmful (artifacts attack the harmful behaviours); ``attack``
    is ``parameters.method`` through :data:`ARTIFACT_ATTACKS` (an unknown
    method in lower case) and ``source`` names attack and model.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkFormatError(f"{path}: not JSON ({err})") from err
    keys = list(data) if isinstance(data, dict) else []
    _require(path, keys, ARTIFACT_KEYS, "jbb_artifact")
    params = data["parameters"] or {}
    method = str(params.get("method") or "").strip()
    if not method:
        raise BenchmarkFormatError(f"{path}: artifact parameters have no 'method'")
    key = "_".join(method.lower().split())
    attack = ARTIFACT_ATTACKS.get(key, key)
    source = f"jbb:{attack}:{params.get('model') or 'unknown'}"
    report = report if report is not None else LoadReport()
    rows: list[dict] = []
    for item in data["jailbreaks"]:
        _add(rows, report, item.get("prompt"), "harmful", str(item.get("category") or ""),
             source, attack)
    return _finish(rows, report, source, len(data["jailbreaks"]))


def read_harmbench(path: str | Path, report: LoadReport | None = None) -> list[dict]:
    """HarmBench behaviours.

    Columns: ``Behavior, FunctionalCategory, SemanticCategory, Tags, ContextString, BehaviorID``.

    Copyright rows ask for verbatim lyrics or book passages and are scored by
    hash matching, not refusal: skipped as ``copyright``. A contextual row's
    behaviour refers to its ``ContextString``, which is put before it,
    separated by a blank line. ``category`` is ``SemanticCategory``.
    """
    path = Path(path)
    cols, records = _read_csv(path)
    _require(path, cols, CSV_COLUMNS["harmbench"], "harmbench")
    report = report if report is not None else LoadReport()
    rows: list[dict] = []
    for rec in records:
        if (rec["FunctionalCategory"] or "").strip() in HARMBENCH_SKIPPED:
            report.skip("copyright")
            continue
        behaviour = (rec["Behavior"] or "").strip()
        context = (rec.get("ContextString") or "").strip()
        text = f"{context}\n\n{behaviour}" if context and behaviour else behaviour
        _add(rows, report, text, "harmful", (rec["SemanticCategory"] or "").strip(),
             f"harmbench:{path.stem}")
    return _finish(rows, report, f"harmbench:{path.stem}", len(records))


def read_orbench(path: str | Path, label: str | None = None,
                 report: LoadReport | None = None) -> list[dict]:
    """OR-Bench (``prompt, category``).

    The side comes from a ``label`` column when the file has one (harmful,
    toxic, unsafe / benign, safe, hard), else from ``label=``, else from the
    file name: ``or-bench-toxic.csv`` is harmful, ``or-bench-hard-1k.csv`` and
    ``or-bench-80k.csv`` benign (the 80k set is the seemingly toxic but safe pool).
    """
    path = Path(path)
    cols, records = _read_csv(path)
    _require(path, cols, CSV_COLUMNS["orbench"], "orbench")
    has_label = "label" in cols
    side = None if has_label else label or _label_from_name(
        path, {**ORBENCH_LABELS, "80k": "benign"}, "orbench")
    report = report if report is not None else LoadReport()
    rows: list[dict] = []
    for rec in records:
        row_side = ORBENCH_LABELS.get((rec["label"] or "").strip().lower()) if has_label else side
        if row_side is None:
            report.skip("bad_label")
            continue
        _add(rows, report, rec["prompt"], row_side, (rec["category"] or "").strip(),
             f"orbench:{path.stem}")
    return _finish(rows, report, f"orbench:{path.stem}", len(records))


READERS: dict[str, Callable[..., list[dict]]] = {
    "xstest": read_xstest,
    "jbb_behaviors": read_jbb_behaviors,
    "jbb_artifact": read_jbb_artifact,
    "harmbench": read_harmbench,
    "orbench": read_orbench,
}


# ------------------------------------------------------------------ detection and dispatch


def detect_format(path: str | Path) -> str:
    """Name the format of a benchmark file from its columns (CSV) or top-level keys (JSON).

    Raises:
        BenchmarkFormatError: naming the path, what it found and every layout it expected.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: no such file")
    expected = "; ".join(f"{name}: {list(cols)}" for name, cols in
                         [*CSV_COLUMNS.items(), ("jbb_artifact", ARTIFACT_KEYS)])
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}: not JSON ({err}); expected {expected}") from err
        found = list(data) if isinstance(data, dict) else [type(data).__name__]
        if all(k in found for k in ARTIFACT_KEYS):
            return "jbb_artifact"
    else:
        found, _ = _read_csv(path)
        for name, cols in CSV_COLUMNS.items():
            if all(c in found for c in cols):
                return name
    raise BenchmarkFormatError(
        f"{path}: unknown benchmark layout; found {found}; expected one of {expected}")


def load_benchmark(path: str | Path, fmt: str = "auto", report: LoadReport | None = None,
                   **kwargs: Any) -> list[dict]:
    """Read any supported benchmark file into rows of :data:`BENCH_KEYS`.

    Args:
        path: The file.
        fmt: ``"auto"`` to detect it, or a key of :data:`READERS`.
        report: Filled in with read, kept and skipped-by-reason counts, if given.
        **kwargs: Passed to the reader (``label=`` for JBB behaviours and OR-Bench).

    Raises:
        BenchmarkFormatError: For an unknown ``fmt``, an unrecognised layout, or
            a file missing the columns its format needs.
    """
    name = detect_format(path) if fmt == "auto" else fmt
    if name not in READERS:
        raise BenchmarkFormatError(f"{path}: unknown format {fmt!r}; expected one of {sorted(READERS)}")
    return READERS[name](path, report=report, **kwargs)
