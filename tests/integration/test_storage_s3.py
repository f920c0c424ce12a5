"""The storage layer against a real S3-protocol server (moto), reached only through AWS_* variables.

No test races concurrent creators here: moto checks ``If-None-Match`` and then writes without a
lock, so under load two creators can both win (seen 2 times in 300 rounds of 16 threads). The
exactly-one-winner tests run on local disk, where the atomicity is ours.
"""

from __future__ import annotations

import io
import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import s3  # noqa: F401 - the fixture

from r2d import commits
from r2d import storage as st

pytestmark = pytest.mark.integration



def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()

@pytest.fixture
def out(s3, request):  # noqa: F811
    """A fresh prefix per test in the module's bucket."""
    return f"s3://{s3['bucket']}/{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)}"


@pytest.fixture
def env(monkeypatch):
    """Change the environment for one test only."""
    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value) if value is not None else monkeypatch.delenv(key, raising=False)
    return set_env


def test_parquet_through_the_returned_filesystem_and_sorted_listing(out):
    table = pa.table({"prompt_id": ["a", "b"], "n": [1, 2]})
    for name in ("b.parquet", "a/2.parquet", "a/10.parquet"):
        fs, path = st.filesystem(st.join(out, name))
        pq.write_table(table, path, filesystem=fs)
    assert st.list_files(out) == [st.join(out, n) for n in ("a/10.parquet", "a/2.parquet", "b.parquet")]
    assert st.list_files(out, recursive=False) == [st.join(out, "b.parquet")]
    fs, path = st.filesystem(st.join(out, "b.parquet"))
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert st.read_parquet(st.list_files(out)).num_rows == 6


def test_whole_objects_exists_and_delete(out):
    uri = st.join(out, "manifest.json")
    assert not st.exists(uri)
    st.makedirs(out)  # a no-op on an object store
    st.write_text(uri, '{"rows": 1}')
    st.write_text(uri, '{"rows": 2}')
    assert st.exists(uri) and json.loads(st.read_text(uri)) == {"rows": 2}
    with pytest.raises(st.NotFound, match=f"read {st.join(out, 'missing')}: no such object"):
        st.read_text(st.join(out, "missing"))
    st.delete(out)
    assert st.list_files(out) == []


def test_copy_tree_up_and_down_and_streams(out, tmp_path):
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    st.copy_tree(str(tmp_path / "ckpt"), st.join(out, "ckpt"))
    assert st.list_files(st.join(out, "ckpt")) == [st.join(out, "ckpt", p) for p in ("config.json", "sub/weights.bin")]
    st.copy_tree(st.join(out, "ckpt"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "weights.bin").read_bytes() == b"\x01" * 1000
    with st.open_output(st.join(out, "stream.bin")) as f:
        f.write(b"abc")
    assert st.open_input(st.join(out, "stream.bin")).read() == b"abc"
    assert abs(st.modified_at(st.join(out, "stream.bin")) - time.time()) < 60


def test_commit_protocol_hides_uncommitted_chunks(out):
    commits.commit_chunk(out, "chunk-r1-0", {"data/chunk-r1-0/part.parquet": pa.table({"prompt_id": ["a", "b"]}),
                                        "drops/chunk-r1-0.jsonl": [{"prompt_id": "c", "reason": "refusal"}]})
    # Killed before the marker: a data file and a truncated JSONL object, both invisible.
    st.write_bytes(st.join(out, "data/chunk-r1-1/part.parquet"), _parquet(pa.table({"prompt_id": ["x"]})))
    st.write_bytes(st.join(out, "drops/chunk-r1-1.jsonl"), b'{"prompt_id": "y", "rea')
    assert [m["name"] for m in commits.committed_chunks(out)] == ["chunk-r1-0"]
    data = commits.committed_files(out, "data/")
    assert st.read_parquet(data).column("prompt_id").to_pylist() == ["a", "b"]
    assert commits.committed_records(out, "drops/") == [{"prompt_id": "c", "reason": "refusal"}]
    with pytest.raises(st.StorageError, match="already committed"):
        commits.commit_chunk(out, "chunk-r1-0", {"data/chunk-r1-0/part.parquet": b"other"})
    assert commits.collect_garbage(out, ("data/", "drops/"), older_than_s=0) == [
        st.join(out, "data/chunk-r1-1/part.parquet"), st.join(out, "drops/chunk-r1-1.jsonl")]
    assert st.read_parquet(data).num_rows == 2


def test_lease_refuses_a_second_owner_and_is_taken_over_after_expiry(out):
    first = commits.acquire_lease(out, "driver-a", ttl_s=60)
    with pytest.raises(commits.LeaseError, match=rf"{st.join(out, commits.LEASE)}: held by 'driver-a' until .*Z"):
        commits.acquire_lease(out, "driver-b", ttl_s=60)
    short = commits.renew_lease(first, ttl_s=0.05)
    time.sleep(0.1)
    second = commits.acquire_lease(out, "driver-b", ttl_s=60)
    with pytest.raises(commits.LeaseError, match="lost by 'driver-a'; held by 'driver-b'"):
        commits.renew_lease(short)
    commits.release_lease(short)  # the conditional delete leaves driver-b's lease alone
    assert json.loads(st.read_text(second.uri))["owner"] == "driver-b"
    commits.release_lease(second)
    assert not st.exists(second.uri)


def test_missing_bucket_names_the_uri(s3):  # noqa: F811
    uri = "s3://no-such-bucket/run/x.json"
    for call in (lambda: st.read_text(uri), lambda: st.write_text(uri, "x"), lambda: st.list_files(uri)):
        with pytest.raises(st.StorageError, match=f"{uri}: the bucket does not exist"):
            call()


@pytest.mark.parametrize("key", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_bad_credentials_name_the_uri(out, env, key):
    env(**{key: "wrong"})
    uri = st.join(out, "x.json")
    with pytest.raises(st.StorageError, match=f"write {uri}: credentials missing or rejected"):
        st.write_text(uri, "x")
    with pytest.raises(st.StorageError, match=f"list {out}: credentials missing or rejected"):
        st.list_files(out)


def test_missing_credentials_and_permission_denied(s3, out, env):  # noqa: F811
    uri = st.join(out, "x.json")
    env(**s3["read_only"])
    with pytest.raises(st.StorageError, match=f"write {uri}: access denied"):
        st.write_text(uri, "x")
    assert st.list_files(out) == []  # the reader may list
    env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    with pytest.raises(st.StorageError, match=f"read {uri}: no credentials found"):
        st.read_text(uri)


def test_unreachable_endpoint_names_the_uri(out, env):
    env(AWS_ENDPOINT_URL="http://127.0.0.1:9")
    with pytest.raises(st.StorageError, match=f"read {out}/x: endpoint unreachable"):
        st.read_text(st.join(out, "x"))


def test_mlflow_logs_an_artifact_to_s3_and_reads_it_back(s3, tmp_path):  # noqa: F811
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = f"s3://{s3['bucket']}/mlflow"
    experiment = mlflow.create_experiment("storage-s3", artifact_location=root)
    (tmp_path / "report.json").write_text('{"asr": 0.03}')
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(tmp_path / "report.json"), artifact_path="eval")
    stored = st.list_files(root)
    assert stored == [f"{root}/{run.info.run_id}/artifacts/eval/report.json"]
    back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="eval/report.json",
                                               dst_path=str(tmp_path / "back"))
    assert json.loads(open(back).read()) == {"asr": 0.03}
