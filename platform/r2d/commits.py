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
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from r2d import storage as st
from r2d.storage import PreconditionFailed, StorageError

COMMITTED = "_committed"
LEASE = "_lease.json"
log = logging.getLogger(__name__)


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
                 meta: dict | None = None, lease: HeldLease | None = None) -> dict:
    """Write a chunk's files, then commit them all at once with a marker written last.

    Args:
        out: the output prefix.
        name: the chunk's unique name, e.g. ``chunk-<run>-<n>``.
        files: paths relative to ``out`` (``data/chunk-x/part.parquet``, ``drops/chunk-x.jsonl``)
            to bytes, a table (written as Parquet) or a list of dicts (written as JSONL).
        meta: more fields for the marker.
        lease: the held lease on ``out``; checked just before the marker is written, so a
            driver that lost it (a paused process whose lease was taken over) commits nothing.

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
    if lease is not None:
        lease.check()
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


def default_owner() -> str:
    """A lease owner name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def wait_for_lease(out: str, owner: str, ttl_s: float = 120, poll_s: float | None = None) -> Lease:
    """Take the lease on ``out``, waiting out a holder that has stopped renewing it.

    A live holder renews its lease every ``ttl_s / 4`` (see :class:`HeldLease`): seeing it renewed
    means a second driver is running, and this one is refused at once. A holder that was killed
    never renews, so its lease is taken over when it expires: a resubmitted job waits at most
    the dead driver's remaining time.

    Raises:
        LeaseError: a live driver holds the lease (the message names it).
    """
    uri = st.join(out, LEASE)
    poll_s = poll_s if poll_s is not None else max(0.5, min(5.0, ttl_s / 8))
    seen: tuple[str, float] | None = None
    while True:
        try:
            return acquire_lease(out, owner, ttl_s)
        except LeaseError:
            pass
        try:
            data, etag = st.read_with_etag(uri)
        except st.NotFound:
            continue  # released meanwhile: try again at once
        held = json.loads(data)
        now = (held["owner"], float(held["expires_at"]))
        if _dead_here(now[0]):
            # Its process is gone from this very host: nobody can renew or write, so take it now.
            body, expires = _body(owner, ttl_s)
            try:
                return Lease(uri, owner, expires, st.put_if(uri, body, etag))
            except (PreconditionFailed, st.NotFound):
                continue
        if seen is not None and now[0] == seen[0] and now[1] > seen[1]:
            raise LeaseError(f"lease {uri}: held by {_holder(uri)}, a live driver (it renewed its lease "
                             "while this one waited); two drivers must not write one output")
        if seen is None:
            log.warning("lease %s is held by %s; waiting to see whether it is renewed or expires",
                        uri, _holder(uri))
        seen = now
        time.sleep(min(poll_s, max(0.05, now[1] - time.time() + 0.05)))


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` (``host:pid:suffix``, see :func:`default_owner`) names a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


class HeldLease:
    """The lease on an output prefix, held for a ``with`` block and renewed in the background.

    Renewal runs every ``ttl_s / 4`` in a daemon thread; if it fails because another owner
    took the lease over, :meth:`check` raises from then on and every commit stops.
    """

    def __init__(self, out: str, owner: str | None = None, ttl_s: float = 120) -> None:
        self.out, self.owner, self.ttl_s = out, owner or default_owner(), ttl_s
        self.lease: Lease | None = None
        self.lost: LeaseError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HeldLease:
        self.lease = wait_for_lease(self.out, self.owner, self.ttl_s)
        self._thread = threading.Thread(target=self._renew, name="r2d-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.lease = renew_lease(self.lease, self.ttl_s)
            except LeaseError as err:
                self.lost = err
                return
            except StorageError as err:  # a transient store error: try again next tick, until expiry
                if time.time() > self.lease.expires_at:
                    self.lost = LeaseError(f"lease {self.lease.uri}: not renewed before it expired ({err})")
                    return
                log.warning("renewing %s failed (%s); retrying", self.lease.uri, err)

    def check(self) -> None:
        """Raise if the lease was lost: whatever this driver would write now might race another."""
        if self.lost is not None:
            raise self.lost
        if self.lease is None or time.time() > self.lease.expires_at:
            raise LeaseError(f"lease on {self.out}: not held (expired before it could be renewed)")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lease is not None and self.lost is None:
            release_lease(self.lease)
