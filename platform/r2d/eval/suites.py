"""Evaluation suites: named built-in prompt sets and user files, as plain rows.

Every suite is a list of rows with one schema, whatever it came from::

    {"prompt": str,        # what the model is sent (attack applied)
     "base_prompt": str,   # the request before any attack (contamination and rubric judge use it)
     "label": "harmful" | "benign",
     "attack": str,        # "none", an r2d.data.attacks name, or an artifact's method
     "category": str, "lookalike": bool, "suite": str, "prompt_id": str}

Built-in suites draw only from the *held-out* side of the deterministic
train/eval split of ``cfg.data.sources`` (:func:`r2d.data.splits.heldout_prompts`),
so their prompts never reach distillation or training:

- ``harmful``: held-out HarmBench / StrongREJECT requests, no attack.
- ``jailbreak``: the same held-out harmful requests wrapped by every attack in
  ``cfg.eval.attacks`` (each attack sees the same requests, so attacks compare fairly).
- ``over_refusal``: held-out benign look-alikes ("how do I kill a Python process").
- ``benign``: held-out everyday benign tasks.
- ``wrapped_benign`` (not run unless named): the held-out benign prompts (everyday and
  look-alike) wrapped by every attack in ``cfg.eval.attacks``, as ``jailbreak`` wraps the
  harmful ones. A model that learned "a jailbreak template means refuse" scores well on
  ``jailbreak`` and refuses these: their refusal rate per attack is the other half of the
  jailbreak numbers (``over_refusal_by_attack``).

Out of distribution (``Suite.ood``; reported apart, and first):

- ``ood_categories``: whole prompt categories held out from training
  (``data.heldout_categories``): safe prompts that sound unsafe and their unsafe
  contrasts of kinds never trained on, and harm categories never trained on.
- any benchmark file in a published format (XSTest, JailbreakBench behaviours and
  artifacts, HarmBench behaviours, OR-Bench; :mod:`r2d.eval.benchmarks`): built
  independently of the training data.

Any CSV, JSONL, JSON or Parquet file with ``prompt`` and ``label`` columns
(optional ``attack``, ``category``, ``lookalike``) is a suite too, and so is a
JailbreakBench-style artifact (rows with ``goal`` and a ready-made jailbreak
``prompt``; the JSON form keeps them under ``"jailbreaks"``). Malformed rows are
skipped and counted in :attr:`Suite.skipped`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from r2d.data.attacks import ATTACKS, apply_attack
from r2d.data.prompts import prompt_id

__all__ = ["BUILTIN_SUITES", "Suite", "SuiteError", "load_suite", "load_suite_file", "load_suites",
           "suite_digest"]

_LABELS = ("harmful", "benign")
_FILE_TYPES = (".csv", ".jsonl", ".json", ".parquet")


class SuiteError(ValueError):
    """A suite name is unknown, a suite file has the wrong shape, or a suite is empty."""


@dataclass
class Suite:
    """One evaluation suite: its rows, where they came from and what was skipped."""

    name: str
    rows: list[dict[str, Any]]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)
    ood: bool = False
    """Out of distribution: prompts built independently of the training data."""

    @property
    def n_harmful(self) -> int:
        return sum(r["label"] == "harmful" for r in self.rows)

    @property
    def n_benign(self) -> int:
        return sum(r["label"] == "benign" for r in self.rows)


def _row(prompt: str, label: str, suite: str, attack: str = "none", base_prompt: str | None = None,
         category: str = "", lookalike: bool = False) -> dict[str, Any]:
    base = base_prompt if base_prompt is not None else prompt
    return {"prompt": prompt, "base_prompt": base, "label": label, "attack": attack or "none",
            "category": category or "", "lookalike": bool(lookalike), "suite": suite,
            "prompt_id": prompt_id(base)}


# ---------------------------------------------------------------- built-in suites

def _heldout(cfg, ood: bool = False) -> list[dict[str, Any]]:
    """Held-out prompt rows of ``cfg.data.sources``: the in-distribution side, or the held-out categories."""
    from r2d.data.splits import heldout_prompts, ood_prompts

    rows = ood_prompts(cfg) if ood else heldout_prompts(cfg)
    if hasattr(rows, "to_pylist"):  # a pyarrow Table
        rows = rows.to_pylist()
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    return [dict(r) for r in rows]


def _is_lookalike(row: dict[str, Any]) -> bool:
    if row.get("lookalike") is not None and str(row.get("lookalike")).lower() not in ("", "false", "0"):
        return True
    return any("lookalike" in str(row.get(key) or "").replace("-", "").replace("_", "")
               for key in ("source", "category", "kind"))


def _by_id(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by prompt id: a cap then keeps the same prompts whatever order the sources load in."""
    return sorted(rows, key=lambda r: r["prompt_id"])


def _held_rows(cfg, suite: str, keep: Callable[[dict], bool], ood: bool = False) -> list[dict[str, Any]]:
    out = []
    for r in _heldout(cfg, ood):
        if r.get("label") not in _LABELS or not str(r.get("prompt") or "").strip():
            continue
        if keep(r):
            out.append(_row(str(r["prompt"]), r["label"], suite, category=str(r.get("category") or ""),
                            lookalike=_is_lookalike(r)))
    return _by_id(out)


def _cap(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    return rows[:limit] if limit else rows


def harmful_suite(cfg) -> list[dict[str, Any]]:
    """Held-out harmful requests, unattacked."""
    rows = _held_rows(cfg, "harmful", lambda r: r["label"] == "harmful")
    return _cap(rows, cfg.eval.max_per_suite)


def _wrapped(cfg, suite: str, label: str) -> list[dict[str, Any]]:
    """Held-out prompts of ``label`` × ``cfg.eval.attacks``; the cap is split evenly over attacks (floor)."""
    attacks = [a for a in cfg.eval.attacks if a != "none"] or ["none"]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SuiteError(f"eval.attacks: unknown attack {unknown[0]!r}, expected names from {sorted(ATTACKS)}")
    base = _held_rows(cfg, suite, lambda r: r["label"] == label)
    if cfg.eval.max_per_suite:
        base = base[:max(1, cfg.eval.max_per_suite // len(attacks))]
    rows = []
    for attack in attacks:
        for r in base:
            rows.append({**r, "prompt": apply_attack(attack, r["base_prompt"]), "attack": attack})
    return rows


def jailbreak_suite(cfg) -> list[dict[str, Any]]:
    """Held-out harmful requests × ``cfg.eval.attacks``; the cap is split evenly over attacks (floor)."""
    return _wrapped(cfg, "jailbreak", "harmful")


def wrapped_benign_suite(cfg) -> list[dict[str, Any]]:
    """Held-out benign prompts (everyday and look-alike) × ``cfg.eval.attacks``, capped as ``jailbreak``."""
    return _wrapped(cfg, "wrapped_benign", "benign")


def over_refusal_suite(cfg) -> list[dict[str, Any]]:
    """Held-out benign prompts that sound harmful."""
    rows = _held_rows(cfg, "over_refusal", lambda r: r["label"] == "benign" and _is_lookalike(r))
    return _cap(rows, cfg.eval.max_per_suite)


def benign_suite(cfg) -> list[dict[str, Any]]:
    """Held-out everyday benign tasks (look-alikes excluded)."""
    rows = _held_rows(cfg, "benign", lambda r: r["label"] == "benign" and not _is_lookalike(r))
    return _cap(rows, cfg.eval.max_per_suite)


def ood_categories_suite(cfg) -> list[dict[str, Any]]:
    """Every prompt of the categories held out whole (``data.heldout_categories``), both labels, unattacked.

    The cap applies per label, so a capped suite still measures both sides.
    """
    rows = _held_rows(cfg, "ood_categories", lambda r: True, ood=True)
    return [r for label in _LABELS for r in _cap([r for r in rows if r["label"] == label], cfg.eval.max_per_suite)]


BUILTIN_SUITES: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "harmful": harmful_suite,
    "jailbreak": jailbreak_suite,
    "over_refusal": over_refusal_suite,
    "benign": benign_suite,
    "wrapped_benign": wrapped_benign_suite,
    "ood_categories": ood_categories_suite,
}
"""Suite name → builder(cfg) -> rows (held-out prompts only)."""
OOD_SUITES = ("ood_categories",)


# ---------------------------------------------------------------- files

def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Rows, column names and file-level metadata of a CSV/JSONL/JSON/Parquet file."""
    suffix = path.suffix.lower()
    meta: dict[str, Any] = {}
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        return rows, columns, meta
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.to_pylist(), table.column_names, meta
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"__malformed__": f"line {n}"})
    else:  # .json: a list of rows, or a JailbreakBench artifact {"parameters": ..., "jailbreaks": [...]}
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("jailbreaks"), list):
            meta = dict(data.get("parameters") or {})
            data = data["jailbreaks"]
        if not isinstance(data, list):
            raise SuiteError(f"{path}: expected a JSON list of rows or an object with a 'jailbreaks' list")
        rows = data
    columns: list[str] = []
    for r in rows:
        if isinstance(r, dict):
            columns.extend(k for k in r if k not in columns and k != "__malformed__")
    return rows, columns, meta


def _is_artifact(columns: list[str]) -> bool:
    return "prompt" in columns and "goal" in columns and "label" not in columns


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y")


def _file_rows(records: list, columns: list[str], meta: dict, name: str) -> tuple[list[dict], Counter]:
    skipped: Counter = Counter()
    artifact = _is_artifact(columns)
    method = str(meta.get("method") or meta.get("attack") or "") or f"artifact_{name}"
    rows = []
    for r in records:
        if not isinstance(r, dict) or "__malformed__" in r:
            skipped["malformed row"] += 1
            continue
        prompt = r.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            # JailbreakBench artifacts hold None where the attack found no jailbreak.
            skipped["empty prompt"] += 1
            continue
        if artifact:
            base = str(r.get("goal") or prompt)
            rows.append(_row(prompt, "harmful", name, str(r.get("attack") or r.get("method") or method), base,
                             str(r.get("category") or "")))
            continue
        label = str(r.get("label") or "").strip().lower()
        if label not in _LABELS:
            skipped[f"label not harmful|benign ({label or 'empty'})"] += 1
            continue
        category = str(r.get("category") or "")
        lookalike = _truthy(r.get("lookalike")) or "lookalike" in category.replace("-", "").replace("_", "")
        base = r.get("base_prompt") if isinstance(r.get("base_prompt"), str) and r.get("base_prompt") else None
        rows.append(_row(prompt, label, name, str(r.get("attack") or "none"), base, category,
                         lookalike and label == "benign"))
    return rows, skipped


def load_suite_file(path: str | Path, max_rows: int = 0) -> Suite:
    """Load a suite file: prompt + label (+ attack, category), or a JailbreakBench artifact.

    Args:
        path: A .csv, .jsonl, .json or .parquet file.
        max_rows: Keep at most this many rows (in file order); 0 keeps all.

    Returns:
        The suite, named after the file's stem.

    Raises:
        SuiteError: When the file is missing, of an unknown type, lacks the
            needed columns (the message lists the columns found) or has no
            usable row.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SuiteError(f"suite file {str(p)!r} does not exist")
    if p.suffix.lower() not in _FILE_TYPES:
        raise SuiteError(f"suite file {str(p)!r}: unsupported type {p.suffix!r}, expected one of {_FILE_TYPES}")
    published = _published_csv(p)
    if published:
        return _benchmark_suite(p, published, max_rows)
    records, columns, meta = _read_records(p)
    if not _is_artifact(columns) and not {"prompt", "label"} <= set(columns):
        raise SuiteError(
            f"suite file {str(p)!r}: expected columns 'prompt' and 'label' (harmful|benign), optional 'attack' "
            f"and 'category'; or a JailbreakBench artifact with 'goal' and 'prompt'. Columns found: {columns}")
    rows, skipped = _file_rows(records, columns, meta, p.stem)
    if not rows:
        raise SuiteError(f"suite file {str(p)!r}: no usable rows (skipped: {dict(skipped)})")
    return Suite(p.stem, _cap(rows, max_rows), str(p), dict(skipped), ood=True)


def _published_csv(path: Path) -> str:
    """The published benchmark format of a CSV file (XSTest, HarmBench, JBB behaviours, OR-Bench), or ""."""
    from r2d.eval.benchmarks import BenchmarkFormatError, detect_format

    if path.suffix.lower() != ".csv":
        return ""
    try:
        fmt = detect_format(path)
    except BenchmarkFormatError:
        return ""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        columns = next(csv.reader(fh), [])
    # A plain prompt,label,category file is the generic suite format, not OR-Bench.
    return "" if fmt == "orbench" and "label" in columns else fmt


def _benchmark_suite(path: Path, fmt: str, max_rows: int) -> Suite:
    """A published benchmark file as an out-of-distribution suite (:mod:`r2d.eval.benchmarks`)."""
    from r2d.data.prompts import LoadReport
    from r2d.eval.benchmarks import load_benchmark

    report = LoadReport()
    found = load_benchmark(path, fmt, report)
    # XSTest's and OR-Bench's safe prompts are built to sound unsafe: they are look-alikes.
    lookalike = fmt in ("xstest", "orbench")
    rows = [_row(r["prompt"], r["label"], path.stem, r["attack"], category=r["category"],
                 lookalike=lookalike and r["label"] == "benign") for r in found]
    if not rows:
        raise SuiteError(f"suite file {str(path)!r} ({fmt}): no usable rows (skipped: {dict(report.skipped)})")
    return Suite(path.stem, _cap(rows, max_rows), f"{fmt}: {path}", dict(report.skipped), ood=True)


# ---------------------------------------------------------------- any suite

def load_suite(spec: str, cfg) -> Suite:
    """Load a built-in suite by name, or a suite file by path.

    Raises:
        SuiteError: On an unknown name that is not a file either, or an empty suite.
    """
    if spec in BUILTIN_SUITES:
        rows = BUILTIN_SUITES[spec](cfg)
        if not rows:
            hint = "list categories in data.heldout_categories" if spec in OOD_SUITES else \
                "add a source that provides them"
            raise SuiteError(f"suite {spec!r}: no held-out prompts for it in data.sources "
                             f"({[s.name for s in cfg.data.sources]}); {hint}")
        if spec in OOD_SUITES:
            return Suite(spec, rows, f"categories held out from training: {cfg.data.heldout_categories}", ood=True)
        return Suite(spec, rows, "held-out split of data.sources")
    if Path(spec).expanduser().suffix.lower() in _FILE_TYPES or Path(spec).expanduser().exists():
        return load_suite_file(spec, cfg.eval.max_per_suite)
    raise SuiteError(f"suite {spec!r}: not a built-in suite {sorted(BUILTIN_SUITES)} nor a "
                     f"{'/'.join(_FILE_TYPES)} file")


def load_suites(specs: list[str], cfg) -> list[Suite]:
    """Load several suites; suite names must be unique (they label the report's rows)."""
    suites = [load_suite(s, cfg) for s in specs]
    for suite in suites:
        for row in suite.rows:
            row["ood"] = suite.ood
    names = [s.name for s in suites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SuiteError(f"suites: {dupes[0]!r} given twice; rename one of the files")
    return suites


def suite_digest(suites: list[Suite]) -> str:
    """A content hash of the exact prompts evaluated (16 hex chars).

    Same prompts, labels and attacks → same digest, whatever their order, so an
    evaluation can be looked up and reused (the ``r2d.eval_run.<digest>`` tag).
    """
    lines = sorted(f"{r['suite']}\t{r['label']}\t{r['attack']}\t{r['prompt']}" for s in suites for r in s.rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
