"""Storage: one way to read and write local paths and ``s3://`` / ``gs://`` URIs alike.

Object stores are reached only through the standard environment, as AWS itself is:
``AWS_ENDPOINT_URL`` (MinIO, moto, GCS's S3 interface), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``. ``gs://`` goes through GCS's S3 interface
(HMAC keys) at ``https://storage.googleapis.com`` unless ``AWS_ENDPOINT_URL`` says otherwise.

An object store has no rename, so nothing here relies on one. A whole-object write is one PUT,
all or nothing; on local disk it is a temp file and ``os.replace``. ``put_if`` is the one atomic
compare-and-swap that ``r2d.commits`` builds exactly-once chunks and the output lease on: an S3
conditional write (``If-None-Match: *`` / ``If-Match: <etag>``, through boto3) or, on local
disk, ``os.link`` of a complete temp file (create only if absent) and a swap under ``flock``.

Every failure comes out as a ``StorageError`` naming the action, the URI and the likely cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from functools import lru_cache

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REMOTE = ("s3", "gs")
GCS_ENDPOINT = "https://storage.googleapis.com"
_TMP = ".tmp-"


class StorageError(OSError):
    """A storage operation failed; the message names the URI, the action and the cause."""


class NotFound(StorageError, FileNotFoundError):
    """The object does not exist (still a ``FileNotFoundError`` for callers that expect one)."""


class PreconditionFailed(StorageError):
    """``put_if``'s condition did not hold: the object exists, or it changed since it was read."""


# The cause is read from the store's own code, which pyarrow and botocore both put in the text.
_CAUSES = (
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket does not exist"),
    (("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch",
      "NoCredentialsError", "Unable to locate credentials", "InvalidClientTokenId"),
     "credentials missing or rejected (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"),
    # A HEAD's 403 has no body, so wrong keys on a read look the same as a missing permission.
    (("ACCESS_DENIED", "AccessDenied", "Forbidden", "403"),
     "access denied (check the permissions of AWS_ACCESS_KEY_ID's user)"),
    (("NETWORK_CONNECTION", "Couldn't connect", "Could not connect", "EndpointConnectionError",
      "Connection refused", "curlCode"), "endpoint unreachable (AWS_ENDPOINT_URL)"),
)


def _cause(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    for needles, cause in _CAUSES:
        if any(n in text for n in needles):
            return cause
    return text.splitlines()[0][:300]


def _code(err: BaseException) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")  # botocore's ClientError


def _storage_error(err: BaseException, uri: str, action: str) -> StorageError:
    """One ``StorageError`` (``NotFound`` for a missing object) for any backend failure."""
    if isinstance(err, StorageError):
        return err
    code = _code(err)
    if code == "NoSuchKey" or isinstance(err, FileNotFoundError) and "NO_SUCH_BUCKET" not in str(err):
        if not is_local(uri) and _bucket_missing(uri):  # a HEAD cannot tell a missing bucket from a key
            return StorageError(f"{action} {uri}: the bucket does not exist")
        return NotFound(f"{action} {uri}: no such object")
    cause = _cause(err)
    if not is_local(uri) and _no_credentials():  # unsigned requests fail in store-specific ways
        cause = "no credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    return StorageError(f"{action} {uri}: {cause}" + (f" [{code}]" if code else ""))


def _no_credentials() -> bool:
    """Whether the standard AWS chain (environment, config files, instance role) finds nothing."""
    try:
        import botocore.session
    except ImportError:
        return not os.environ.get("AWS_ACCESS_KEY_ID")
    return botocore.session.get_session().get_credentials() is None


def _bucket_missing(uri: str) -> bool:
    with contextlib.suppress(Exception):
        fs, path = filesystem(uri)
        return fs.get_file_info(path.split("/")[0]).type == pafs.FileType.NotFound
    return False


@contextlib.contextmanager
def _errors(uri: str, action: str):
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every backend failure becomes a StorageError
        raise _storage_error(err, uri, action) from None


# --- addresses -------------------------------------------------------------------------------

def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs; False for object-store URIs."""
    return _scheme(str(uri)) in ("", "file")


def join(uri: str, *parts: str) -> str:
    """Join path parts with ``/`` for object stores and the OS separator locally."""
    uri = str(uri)
    if is_local(uri):
        return os.path.join(uri, *parts)
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def _endpoint(scheme: str) -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or (
        GCS_ENDPOINT if scheme == "gs" else None)


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    # Keyed by the environment it was built from, so a changed environment gets a new client.
    # The endpoint is passed explicitly: not every pyarrow reads AWS_ENDPOINT_URL by itself.
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to hand it.

    Use the pair with anything that takes ``filesystem=``: ``pq.read_table(path, filesystem=fs)``,
    Ray Data's ``write_parquet``, Ray Train's ``RunConfig(storage_filesystem=fs)``.
    """
    uri = str(uri)
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(uri.split("://", 1)[-1])
    if scheme not in REMOTE:
        raise StorageError(f"{uri}: unsupported scheme {scheme!r} (expected a path, s3:// or gs://)")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    with _errors(uri, "connect"):
        fs = _s3fs(_endpoint(scheme), region, os.environ.get("AWS_ACCESS_KEY_ID"))
    return fs, uri.split("://", 1)[1]


def _uri(uri: str, path: str) -> str:
    return path if is_local(uri) else f"{_scheme(uri)}://{path}"


# --- whole objects ---------------------------------------------------------------------------

def exists(uri: str) -> bool:
    """Whether a file or object (or a local folder) exists at ``uri``."""
    fs, path = filesystem(uri)
    with _errors(uri, "stat"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def modified_at(uri: str) -> float:
    """When the file or object was last written, in seconds since the epoch."""
    fs, path = filesystem(uri)
    with _errors(uri, "stat"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise NotFound(f"stat {uri}: no such object")
    return info.mtime.timestamp()


def read_bytes(uri: str) -> bytes:
    """The whole object; ``NotFound`` when it is absent."""
    fs, path = filesystem(uri)
    with _errors(uri, "read"), fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; readers see the old content or the new, never a part of it."""
    fs, path = filesystem(uri)
    with _errors(uri, "write"):
        if is_local(uri):
            _local_write(path, data)
        else:
            with fs.open_output_stream(path) as f:  # an object appears only when its upload completes
                f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def _local_write(path: str, data: bytes) -> str:
    """Write a temp file beside ``path`` (same filesystem, so the rename is atomic) and fsync it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f"{_TMP}{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # a kill is survived without it, a power cut is not
    os.replace(tmp, path)
    return path


def delete(uri: str, missing_ok: bool = True) -> None:
    """Delete one object or a whole folder / prefix."""
    fs, path = filesystem(uri)
    with _errors(uri, "delete"):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
        elif not missing_ok:
            raise NotFound(f"delete {uri}: no such object")


def makedirs(uri: str) -> None:
    """Create a local folder; a no-op on object stores, where prefixes need no creating."""
    if is_local(uri):
        os.makedirs(filesystem(uri)[1], exist_ok=True)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """URIs of the files under ``uri``, sorted; empty when nothing is there."""
    fs, path = filesystem(uri)
    with _errors(uri, "list"):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    if not infos and not is_local(uri) and _bucket_missing(uri):  # a listing of no bucket is empty
        raise StorageError(f"list {uri}: the bucket does not exist")
    return sorted(_uri(uri, i.path) for i in infos
                  if i.type == pafs.FileType.File and not i.base_name.startswith(_TMP))


def open_input(uri: str) -> pa.NativeFile:
    """A random-access file for pyarrow readers (``pq.ParquetFile(open_input(uri))``)."""
    fs, path = filesystem(uri)
    with _errors(uri, "open"):
        return fs.open_input_file(path)


def open_output(uri: str) -> pa.NativeFile:
    """A stream for large writes (checkpoints). Not atomic on local disk: commit it with a marker."""
    fs, path = filesystem(uri)
    with _errors(uri, "open"):
        if is_local(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open_output_stream(path)


def copy_tree(src: str, dst: str) -> None:
    """Copy a folder or prefix between any two locations (checkpoints up, models down)."""
    (sfs, spath), (dfs, dpath) = filesystem(src), filesystem(dst)
    with _errors(f"{src} -> {dst}", "copy"):
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def read_parquet(uris: list[str], columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """Concatenate Parquet files (all on one store) into one table."""
    if not uris:
        raise StorageError("read_parquet: no files given")
    fs, _ = filesystem(uris[0])
    with _errors(uris[0], "read parquet"):
        return pa.concat_tables([pq.read_table(filesystem(u)[1], columns=columns, schema=schema, filesystem=fs)
                                 for u in uris])


# --- compare-and-swap: the one atomic primitive the commit marker and the lease need -----------

def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'  # what S3 returns for a single-part PUT


def _file_etag(path: str) -> str | None:
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        return _etag(f.read())
    return None


@lru_cache(maxsize=8)
def _boto(endpoint: str | None, region: str | None, key_id: str | None):
    try:
        import boto3
    except ImportError as err:
        raise StorageError("conditional writes on an object store need boto3 (pip install boto3)") from err
    from botocore.config import Config

    # A session of its own: boto3's default session is not safe to build clients from in threads.
    # Checksums only when required: S3-compatible stores (GCS, older MinIO) reject the newer ones.
    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _bucket_key(uri: str):
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    return _boto(_endpoint(_scheme(uri)), region, os.environ.get("AWS_ACCESS_KEY_ID")), bucket, key


def read_with_etag(uri: str) -> tuple[bytes, str]:
    """The object and its ETag (an MD5 on local disk), for a later ``put_if``."""
    if is_local(uri):
        data = read_bytes(uri)
        return data, _etag(data)
    client, bucket, key = _bucket_key(uri)
    with _errors(uri, "read"):
        got = client.get_object(Bucket=bucket, Key=key)
        return got["Body"].read(), got["ETag"]


@contextlib.contextmanager
def _local_lock(path: str):
    import fcntl

    # flock, not a lock file created with O_EXCL: the kernel drops it when its holder dies.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def put_if(uri: str, data: bytes, etag: str | None) -> str:
    """Write ``uri`` only if it is absent (``etag=None``) or still has ``etag``; return the new ETag.

    Raises ``PreconditionFailed`` when the condition does not hold. On S3 this is one conditional
    PUT. On local disk a create is ``os.link`` of a complete temp file (it fails if the target
    exists, and never shows a half-written file); a swap compares and replaces under ``flock``.
    """
    if not is_local(uri):
        client, bucket, key = _bucket_key(uri)
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except Exception as err:  # noqa: BLE001
            # An If-Match on a key deleted meanwhile answers NoSuchKey: the swap lost all the same.
            if _code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                raise PreconditionFailed(f"conditional write {uri}: {_code(err)}") from None
            raise _storage_error(err, uri, "conditional write") from None
    path = filesystem(uri)[1]
    with _errors(uri, "conditional write"):
        if etag is None:
            tmp = _local_write(os.path.join(os.path.dirname(path), f"{_TMP}{uuid.uuid4().hex}"), data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PreconditionFailed(f"conditional write {uri}: exists") from None
            finally:
                os.unlink(tmp)
            return _etag(data)
        with _local_lock(path):
            if _file_etag(path) != etag:
                raise PreconditionFailed(f"conditional write {uri}: changed")
            _local_write(path, data)
            return _etag(data)


def delete_if(uri: str, etag: str) -> None:
    """Delete ``uri`` only if it still has ``etag``; ``PreconditionFailed`` otherwise."""
    if not is_local(uri):
        client, bucket, key = _bucket_key(uri)
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except Exception as err:  # noqa: BLE001
            if _code(err) in ("PreconditionFailed", "NoSuchKey"):
                raise PreconditionFailed(f"conditional delete {uri}: {_code(err)}") from None
            raise _storage_error(err, uri, "conditional delete") from None
        return
    path = filesystem(uri)[1]
    with _errors(uri, "conditional delete"), _local_lock(path):
        if _file_etag(path) != etag:
            raise PreconditionFailed(f"conditional delete {uri}: changed")
        os.unlink(path)
