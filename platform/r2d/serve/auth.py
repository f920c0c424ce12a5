"""Who may talk to the server: API and admin keys, and the refusal to serve the network without one.

Where the keys come from, and why not from Ray. The ingress replica reads each key
*itself*, from a file (``serve.api_key_file``: a mounted Kubernetes secret, a 0600 file
on the node) or from its own node's environment (``serve.api_key_env``, set on the pod or
the node, or in the shell that starts a local Ray). The key never travels through Ray:
a ``runtime_env`` (where it used to go) is shown by the dashboard, ``ray job`` and
``ray list actors --detail`` to anyone who can reach the cluster; Ray's internal KV store
is as open. A path can travel anywhere: it is not a secret.

Bind rule: a host other than loopback without an API key is refused at start-up, by the
job that binds it and again by the ingress replica (which is what ``serve run`` and a
RayService start), unless ``serve.insecure`` says so, which is logged as a warning.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from pathlib import Path

log = logging.getLogger("r2d.serve")
ADMIN_HEADER = "x-r2d-admin-key"
"""Header carrying the admin key on a chat request that asks for a weaker mode."""


class AuthConfigError(RuntimeError):
    """A key file is unreadable, or the server would face the network without a key."""


def read_key(env_name: str, file_path: str, what: str = "API key") -> str:
    """The key from ``file_path`` (when set) or the environment variable ``env_name``; "" when neither is set.

    Raises:
        AuthConfigError: ``file_path`` is set but missing or empty (fail closed: a typo must
            not turn authentication off).
    """
    if file_path:
        path = Path(file_path).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as err:
            raise AuthConfigError(f"{what} file {str(path)!r} cannot be read: {err.strerror}") from None
        if not key:
            raise AuthConfigError(f"{what} file {str(path)!r} is empty")
        return key
    return os.environ.get(env_name, "").strip() if env_name else ""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: assume it is reachable


def check_exposure(host: str, api_key: str, insecure: bool) -> None:
    """Refuse to serve a non-loopback ``host`` without an API key, unless ``insecure``.

    Raises:
        AuthConfigError: naming the host and the ways to set a key.
    """
    if api_key or is_loopback(host):
        return
    if not insecure:
        raise AuthConfigError(
            f"serve.host: got {host!r}, which other machines can reach, and no API key is set; set "
            "serve.api_key_file (or the serve.api_key_env variable, R2D_API_KEY by default, on the serving "
            "nodes), bind 127.0.0.1, or set serve.insecure=true to serve without authentication")
    log.warning("!!! INSECURE: serving %s without an API key (serve.insecure=true): anyone who reaches this "
                "address can use the model !!!", host)


def preflight(cfg) -> None:
    """The binding job's check, before it starts Serve (the replica checks again with the key it reads).

    A key *file* is trusted here: it may exist only on the serving nodes.

    Raises:
        AuthConfigError: see :func:`check_exposure`.
    """
    key = "file" if cfg.api_key_file else read_key(cfg.api_key_env, "")
    check_exposure(cfg.host, key, cfg.insecure)


def bearer(header: str) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" when absent or another scheme)."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def same_key(given: str, expected: str) -> bool:
    """Constant-time comparison; an empty expected key never matches."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
