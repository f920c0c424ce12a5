"""Exactly-once output on any store: chunks committed by a marker, and a lease on the prefix.

Layout under an output prefix ``out``::

    data/chunk-<run>-<n>/part.parquet     a chunk's files, under keys no other chunk uses
    drops/chunk-<run>-<n>.jsonl           (records too: written whole, never appended to)
    _committed/chunk-<run>-<n>.json       the marker, created LAST and only if absent
    _lease.json                           who may write here, and until when

There is no atomic rename on an object store, so the marker is the commit point. Readers see
only the files that markers list: a crash before the marker leaves files nobody reads, with no
truncated line to trip over, and ``collect_garbage`` deletes them later. A chunk commits at most
once, because its marker is created only if absent.

The lease keeps a second driver of the same run from writing beside the first. Taking it,
renewing it and taking over an expired one are compare-and-swaps (``storage.put_if``): S3
conditional writes, or ``os.link`` and ``flock`` on local disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from r2d import storage as st
from r2d.storage import PreconditionFailed, StorageError

COMMITTED = "_committed"
LEASE = "_lease.json"


class LeaseError(StorageError):
    """Another live owner holds the lease, or ours was lost."""


def _encode(body: bytes | pa.Table | list[dict]) -> tuple[bytes, int | None]:
    """A file's bytes and its row count: tables become Parquet, lists of dicts JSONL."""
    if isinstance(body, pa.Table):
        sink = io.BytesIO()
        pq.write_table(body, sink)
        return sink.getvalue(), body.num_rows
    if isinstance(body, list):
        return "".join(json.dumps(r, sort_keys=True) + "\n" for r in body).encode(), len(body)
    return body, None


def commit_chunk(out: str, name: str, files: dict[str, bytes | pa.Table | list[dict]],
                 meta: dict | None = None) -> dict:
    """Write a chunk's files, then commit them all at once with a marker written last.

    Args:
        out: the output prefix.
        name: the chunk's unique name, e.g. ``chunk-<run>-<n>``.
        files: paths relative to ``out`` (``data/chunk-x/part.parquet``, ``drops/chunk-x.jsonl``)
            to bytes, a table (written as Parquet) or a list of dicts (written as JSONL).
        meta: more fields for the marker.

    Returns:
        The marker: ``name``, ``files`` (relative path to its row count; None for bytes),
        ``rows`` (the tables' rows), ``committed_at`` and ``meta``'s fields.

    Raises:
        StorageError: the chunk was committed before.
    """
    marker_uri = st.join(out, COMMITTED, f"{name}.json")
    # Checked first, so that a repeated commit cannot overwrite committed data. Two writers
    # committing one name at once is what the lease rules out; even then one marker wins.
    if st.exists(marker_uri):
        raise StorageError(f"commit {marker_uri}: already committed")
    listed, rows = {}, 0
    for rel, body in sorted(files.items()):
        blob, listed[rel] = _encode(body)
        rows += body.num_rows if isinstance(body, pa.Table) else 0
        st.write_bytes(st.join(out, rel), blob)
    marker = {"name": name, "files": listed, "rows": rows,
              "committed_at": datetime.now(timezone.utc).isoformat(), **(meta or {})}
    try:
        st.put_if(marker_uri, json.dumps(marker, sort_keys=True).encode(), None)
    except PreconditionFailed:
        raise StorageError(f"commit {marker_uri}: already committed") from None
    return marker


def committed_chunks(out: str) -> list[dict]:
    """The markers of every committed chunk under ``out``, sorted by name."""
    uris = st.list_files(st.join(out, COMMITTED), recursive=False)
    return sorted((json.loads(st.read_bytes(u)) for u in uris if u.endswith(".json")), key=lambda m: m["name"])


def committed_files(out: str, prefix: str = "", suffix: str = "") -> list[str]:
    """URIs of the committed files whose relative path starts with ``prefix`` and ends with ``suffix``."""
    return sorted(st.join(out, rel) for m in committed_chunks(out) for rel in m["files"]
                  if rel.startswith(prefix) and rel.endswith(suffix))


def committed_records(out: str, prefix: str) -> list[dict]:
    """The JSONL records of every committed file under ``prefix`` (e.g. ``drops/``), in chunk order."""
    return [json.loads(line) for uri in committed_files(out, prefix)
            for line in st.read_text(uri).splitlines() if line.strip()]


def collect_garbage(out: str, prefixes: tuple[str, ...] = ("data/",), older_than_s: float = 3600) -> list[str]:
    """Delete files under ``prefixes`` that no marker lists: the leftovers of crashed commits.

    Run it while holding the lease. A file younger than ``older_than_s`` may belong to a commit
    still in flight, so it is kept.

    Returns:
        The deleted URIs, sorted.
    """
    keep = set(committed_files(out))
    orphans = [u for prefix in prefixes for u in st.list_files(st.join(out, prefix)) if u not in keep]
    deleted = sorted(u for u in orphans if time.time() - st.modified_at(u) >= older_than_s)
    for uri in deleted:
        st.delete(uri)
    return deleted


@dataclass(frozen=True)
class Lease:
    """A held lease: the object that records it, its owner, its expiry and the ETag we wrote."""

    uri: str
    owner: str
    expires_at: float
    etag: str


def _body(owner: str, ttl_s: float) -> tuple[bytes, float]:
    expires = time.time() + ttl_s
    return json.dumps({"owner": owner, "expires_at": expires}).encode(), expires


def _holder(uri: str) -> str:
    """Who holds the lease and until when, for error messages."""
    with contextlib.suppress(StorageError, ValueError, KeyError):
        held = json.loads(st.read_bytes(uri))
        until = datetime.fromtimestamp(held["expires_at"], timezone.utc)
        return f"{held['owner']!r} until {until:%Y-%m-%dT%H:%M:%SZ} ({held['expires_at'] - time.time():.0f} s left)"
    return "nobody (released meanwhile)"


def acquire_lease(out: str, owner: str, ttl_s: float = 300) -> Lease:
    """Take the lease on ``out`` if it is free, expired or already ``owner``'s.

    Expiry is judged by wall clocks, so keep ``ttl_s`` far above the clock skew between drivers,
    and renew well before it runs out.

    Args:
        out: the output prefix.
        owner: a name unique to this driver (host, process, run).
        ttl_s: seconds until the lease expires unless renewed.

    Raises:
        LeaseError: another owner holds a live lease (the message names it and its expiry).
    """
    uri = st.join(out, LEASE)
    body, expires = _body(owner, ttl_s)
    for _ in range(3):  # a release between our create and our read sends us round again
        try:
            return Lease(uri, owner, expires, st.put_if(uri, body, None))
        except PreconditionFailed:
            pass
        try:
            data, etag = st.read_with_etag(uri)
        except st.NotFound:
            continue
        held = json.loads(data)
        if held["owner"] != owner and held["expires_at"] > time.time():
            raise LeaseError(f"lease {uri}: held by {_holder(uri)}")
        try:  # expired, or ours: take it over only if nobody else has since we read it
            return Lease(uri, owner, expires, st.put_if(uri, body, etag))
        except PreconditionFailed:
            raise LeaseError(f"lease {uri}: taken over concurrently; held by {_holder(uri)}") from None
    raise LeaseError(f"lease {uri}: contended; not acquired")


def renew_lease(lease: Lease, ttl_s: float = 300) -> Lease:
    """Extend a held lease by ``ttl_s`` from now.

    Raises:
        LeaseError: the lease was lost (it expired and another owner took it over).
    """
    body, expires = _body(lease.owner, ttl_s)
    try:
        return Lease(lease.uri, lease.owner, expires, st.put_if(lease.uri, body, lease.etag))
    except PreconditionFailed:
        raise LeaseError(f"lease {lease.uri}: lost by {lease.owner!r}; held by {_holder(lease.uri)}") from None


def release_lease(lease: Lease) -> None:
    """Give the lease up; one already taken over by another owner is left alone."""
    with contextlib.suppress(PreconditionFailed, st.NotFound):
        st.delete_if(lease.uri, lease.etag)
