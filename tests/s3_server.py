"""A real S3-protocol server for tests: moto's server, in its own process, on a free port.

The code under test reaches it only through the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and
``MLFLOW_S3_ENDPOINT_URL`` for MLflow's artifact store), as it would reach AWS or MinIO.

The server checks credentials: it starts open, the helper creates an IAM user with full S3
access (its keys go in the environment) and one that may only read, then switches
authentication on. So wrong keys and missing permissions fail as they would on AWS.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from ports import free_port

BUCKET = "r2d-test"
REGION = "us-east-1"
READ_ONLY = ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"]


def start(port: int | None = None, timeout_s: float = 30) -> tuple[subprocess.Popen, str]:
    """Start ``python -m moto.server`` and wait until it answers; returns the process and its URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto server did not answer on {url} within {timeout_s} s")


def _user(iam, name: str, actions: list[str]) -> dict[str, str]:
    iam.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextlib.contextmanager
def s3_environment(bucket: str = BUCKET):
    """A running server with ``bucket``, its environment set for the duration.

    Yields:
        dict: ``url``, ``bucket``, ``env`` (what was set) and ``read_only`` (keys of a user
        that may only read).
    """
    import boto3

    proc, url = start()
    saved = dict(os.environ)
    try:
        admin = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", endpoint_url=url, region_name=REGION, **admin)
        env = _user(iam, "r2d", ["s3:*"])
        read_only = _user(iam, "r2d-reader", READ_ONLY)
        boto3.client("s3", endpoint_url=url, region_name=REGION, **admin).create_bucket(Bucket=bucket)
        # From here on every request must be signed by a known user with the right policy.
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/moto-api/reset-auth", data=b"0", headers={"Content-Type": "text/plain"})).close()
        env |= {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": url}
        os.environ.update(env)
        yield {"url": url, "bucket": bucket, "env": env, "read_only": read_only}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def s3():
    """One moto server per test module; tests write under their own prefixes."""
    with s3_environment() as server:
        yield server
