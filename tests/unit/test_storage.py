"""The storage layer on local disk: addresses, whole-object writes, commits and the lease."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from r2d import commits
from r2d import storage as st



def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()

def test_join_and_is_local(tmp_path):
    assert st.join("s3://bucket/out/", "data", "/chunk-a/", "part.bin") == "s3://bucket/out/data/chunk-a/part.bin"
    assert st.join("gs://bucket", "x") == "gs://bucket/x"
    assert st.join(str(tmp_path), "data", "x") == os.path.join(str(tmp_path), "data", "x")
    assert st.is_local("runs/out") and st.is_local("file:///tmp/x") and st.is_local(tmp_path)
    assert not st.is_local("s3://b/x") and not st.is_local("GS://b/x")


def test_filesystem_splits_uri_into_filesystem_and_path(tmp_path):
    fs, path = st.filesystem(str(tmp_path / "a.txt"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a.txt")
    fs, path = st.filesystem("s3://bucket/out/data")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/out/data"
    with pytest.raises(st.StorageError, match=r"hdfs://x/y: unsupported scheme 'hdfs'"):
        st.filesystem("hdfs://x/y")


def test_write_read_exists_delete(tmp_path):
    uri = st.join(str(tmp_path), "deep", "er", "note.txt")
    assert not st.exists(uri)
    st.write_text(uri, "one")
    st.write_text(uri, "two")  # a whole-object overwrite
    assert st.exists(uri) and st.read_text(uri) == "two" and st.read_bytes(uri) == b"two"
    st.delete(st.join(str(tmp_path), "deep"))
    assert not st.exists(uri)
    st.delete(uri)  # missing is fine by default
    with pytest.raises(st.NotFound):
        st.delete(uri, missing_ok=False)


def test_local_write_is_atomic_when_the_writer_dies(tmp_path, monkeypatch):
    uri = str(tmp_path / "manifest.json")
    st.write_text(uri, "old")

    def die(*_):
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        st.write_text(uri, "new")
    assert st.read_text(uri) == "old"  # readers never see a half-written file
    assert st.list_files(str(tmp_path)) == [uri]  # the orphaned temp file is not listed


def test_list_files_sorted_recursive_and_missing(tmp_path):
    for rel in ("b/2.txt", "a/10.txt", "a/9.txt", "c.txt"):
        st.write_text(st.join(str(tmp_path), rel), rel)
    root = str(tmp_path)
    assert st.list_files(root) == [st.join(root, r) for r in ("a/10.txt", "a/9.txt", "b/2.txt", "c.txt")]
    assert st.list_files(root, recursive=False) == [st.join(root, "c.txt")]
    assert st.list_files(st.join(root, "missing")) == []


def test_makedirs_and_parquet_through_the_returned_filesystem(tmp_path):
    out = st.join(str(tmp_path), "x", "y")
    st.makedirs(out)
    assert os.path.isdir(out)
    table = pa.table({"a": [1, 2, 3]})
    fs, path = st.filesystem(st.join(out, "t.parquet"))
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert pq.ParquetFile(st.open_input(st.join(out, "t.parquet"))).read().equals(table)
    assert st.read_parquet([st.join(out, "t.parquet")] * 2).num_rows == 6


def test_streams_copy_tree_and_modified_at(tmp_path):
    src, dst = str(tmp_path / "ckpt"), str(tmp_path / "copy")
    with st.open_output(st.join(src, "sub", "weights.bin")) as f:
        f.write(b"\x00" * 10)
    st.write_text(st.join(src, "config.json"), "{}")
    st.copy_tree(src, dst)
    assert st.list_files(dst) == [st.join(dst, "config.json"), st.join(dst, "sub", "weights.bin")]
    assert st.read_bytes(st.join(dst, "sub", "weights.bin")) == b"\x00" * 10
    assert abs(st.modified_at(st.join(dst, "config.json")) - time.time()) < 60


def test_missing_object_is_not_found_naming_the_uri(tmp_path):
    uri = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=f"read {uri}: no such object"):
        st.read_text(uri)


def test_cause_is_read_from_the_backends_error_text():
    cause = st._cause
    assert cause(OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2")) == "the bucket does not exist"
    assert "credentials" in cause(OSError("AWS Error INVALID_ACCESS_KEY_ID during PutObject"))
    assert "access denied" in cause(OSError("AWS Error ACCESS_DENIED during HeadObject"))
    assert "unreachable" in cause(OSError("AWS Error NETWORK_CONNECTION during HeadObject: curlCode: 7"))
    assert cause(ValueError("something else\nand more")) == "ValueError: something else"


def _chunk(out: str, name: str, ids: list[str], drops: list[dict] | None = None) -> dict:
    files = {f"data/{name}/part.parquet": pa.table({"prompt_id": ids})}
    if drops is not None:
        files[f"drops/{name}.jsonl"] = drops
    return commits.commit_chunk(out, name, files, meta={"run": "r1"})


def test_commit_protocol_hides_uncommitted_chunks(tmp_path):
    out = str(tmp_path / "traces")
    marker = _chunk(out, "chunk-r1-0", ["a", "b"], drops=[{"prompt_id": "c", "reason": "refusal"}])
    assert marker["rows"] == 2 and marker["run"] == "r1"
    assert marker["files"] == {"data/chunk-r1-0/part.parquet": 2, "drops/chunk-r1-0.jsonl": 1}
    _chunk(out, "chunk-r1-1", ["d"])
    # A crash between the data and the marker: the file is there, the marker is not.
    st.write_bytes(st.join(out, "data/chunk-r1-2/part.parquet"), _parquet(pa.table({"prompt_id": ["e"]})))

    assert [m["name"] for m in commits.committed_chunks(out)] == ["chunk-r1-0", "chunk-r1-1"]
    data = commits.committed_files(out, "data/", ".parquet")
    assert data == [st.join(out, f"data/chunk-r1-{i}/part.parquet") for i in (0, 1)]
    assert st.read_parquet(data).column("prompt_id").to_pylist() == ["a", "b", "d"]

    assert commits.collect_garbage(out, older_than_s=3600) == []  # too young: may be a commit in flight
    assert commits.collect_garbage(out, older_than_s=0) == [st.join(out, "data/chunk-r1-2/part.parquet")]
    assert len(st.list_files(st.join(out, "data"))) == 2


def test_a_chunk_commits_at_most_once(tmp_path):
    out = str(tmp_path)
    _chunk(out, "chunk-r1-0", ["a"])
    with pytest.raises(st.StorageError, match="already committed"):
        _chunk(out, "chunk-r1-0", ["a", "b"])
    assert commits.committed_chunks(out)[0]["rows"] == 1


def test_jsonl_records_survive_a_kill_mid_write(tmp_path):
    out = str(tmp_path)
    _chunk(out, "chunk-r1-0", [], drops=[{"prompt_id": "x", "reason": "too_long"}])
    # Killed mid-write: a truncated line, and no marker.
    st.write_bytes(st.join(out, "drops/chunk-r1-1.jsonl"), b'{"prompt_id": "y", "rea')
    assert commits.committed_records(out, "drops/") == [{"prompt_id": "x", "reason": "too_long"}]


def test_concurrent_commits_of_one_chunk_let_exactly_one_win(tmp_path):
    wins, errors = [], []

    def commit(i):
        try:
            wins.append(commits.commit_chunk(str(tmp_path), "chunk-r1-0", {"x.bin": bytes([i])}))
        except st.StorageError as err:
            errors.append(err)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1 and len(errors) == 7


def test_lease_refuses_a_second_owner_until_it_expires(tmp_path):
    out = str(tmp_path / "run")
    lease = commits.acquire_lease(out, "driver-a", ttl_s=60)
    assert json.loads(st.read_text(lease.uri))["owner"] == "driver-a"
    with pytest.raises(commits.LeaseError, match=r"held by 'driver-a' until .*Z \((59|60) s left\)"):
        commits.acquire_lease(out, "driver-b", ttl_s=60)
    assert commits.acquire_lease(out, "driver-a", ttl_s=60).owner == "driver-a"  # a restarted driver


def test_expired_lease_is_taken_over_and_the_old_owner_loses_it(tmp_path):
    out = str(tmp_path)
    old = commits.acquire_lease(out, "driver-a", ttl_s=0.05)
    time.sleep(0.1)
    new = commits.acquire_lease(out, "driver-b", ttl_s=60)
    with pytest.raises(commits.LeaseError, match="lost by 'driver-a'; held by 'driver-b'"):
        commits.renew_lease(old)
    commits.release_lease(old)  # a lost lease is not released from under its new owner
    assert json.loads(st.read_text(new.uri))["owner"] == "driver-b"
    renewed = commits.renew_lease(new, ttl_s=120)
    assert renewed.expires_at > new.expires_at
    commits.release_lease(renewed)
    assert not st.exists(new.uri)
    assert commits.acquire_lease(out, "driver-c").owner == "driver-c"


@pytest.mark.parametrize("expired", [False, True])
def test_concurrent_acquires_let_exactly_one_owner_win(tmp_path, expired):
    out = str(tmp_path)
    if expired:
        commits.acquire_lease(out, "dead-driver", ttl_s=0.01)
        time.sleep(0.05)
    winners, refused, failed = [], [], []

    def acquire(i):
        try:
            winners.append(commits.acquire_lease(out, f"driver-{i}", ttl_s=60).owner)
        except commits.LeaseError:
            refused.append(i)
        except Exception as err:  # noqa: BLE001 - shown by the assert below
            failed.append(err)

    threads = [threading.Thread(target=acquire, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not failed and len(winners) == 1 and len(refused) == 7, (winners, failed)
    assert json.loads(st.read_text(st.join(out, commits.LEASE)))["owner"] == winners[0]
