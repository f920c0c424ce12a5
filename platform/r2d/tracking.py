"""Small MLflow utilities shared by lineage, promotion and evaluation.

- :func:`connect` points MLflow at the tracking URI and fails fast, naming the URI,
  when a tracking server does not answer. MLflow's own client retries with backoff
  for minutes before giving up, which looks like a hang to someone running a job.
- :func:`resolve_version` turns ``models:/name@alias`` or ``models:/name/version`` into a
  registered model version, with an error that says which name, alias or version is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from r2d.runtime import tracking_uri


class TrackingError(RuntimeError):
    """The tracking server, a registered model, an alias, a version or a run is missing."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed registry URI: exactly one of ``alias`` and ``version`` is set."""

    name: str
    alias: str = ""
    version: str = ""

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    """Parse ``models:/name@alias`` or ``models:/name/version``.

    Raises:
        TrackingError: for anything else, showing the accepted forms.
    """
    expected = "expected models:/name@alias or models:/name/version, e.g. models:/r2d@champion"
    if not isinstance(uri, str) or not uri.startswith("models:/"):
        raise TrackingError(f"model URI {uri!r}: {expected}")
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return ModelRef(name=name, alias=alias)
    else:
        name, _, version = body.partition("/")
        if name and version.isdigit():
            return ModelRef(name=name, version=version)
    raise TrackingError(f"model URI {uri!r}: {expected}")


def _probe_server(uri: str, timeout_s: float) -> None:
    """GET ``/health`` once: a closed port or a dead host fails in ``timeout_s``, not minutes."""
    import httpx

    url = uri.rstrip("/") + "/health"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}: {err}); start it, or point "
            "MLFLOW_TRACKING_URI / tracking.uri at a running server (empty means local sqlite)") from None
    if response.status_code >= 500:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {response.status_code}")


def connect(uri: str = "", timeout_s: float = 10.0):
    """Point MLflow at the tracking URI and return an ``MlflowClient`` once the store answers.

    Args:
        uri: explicit tracking URI; empty means ``MLFLOW_TRACKING_URI``, else local sqlite.
        timeout_s: how long an HTTP tracking server gets to answer the probe.

    Raises:
        TrackingError: naming the URI when the server does not answer.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    resolved = tracking_uri(uri)
    if resolved.startswith(("http://", "https://")):
        _probe_server(resolved, timeout_s)
    mlflow.set_tracking_uri(resolved)
    # A registry on the same store; a separate registry URI would come from MLFLOW_REGISTRY_URI.
    client = MlflowClient(tracking_uri=resolved)
    try:
        client.search_experiments(max_results=1)
    except MlflowException as err:
        raise TrackingError(f"MLflow tracking store {resolved} does not answer: {err.message}") from None
    return client


def resolve_version(client, uri: str):
    """Resolve a registry URI to its ``ModelVersion``.

    Raises:
        TrackingError: naming the missing registered model, alias (with the aliases that
            exist) or version.
    """
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    model = get_registered_model(client, ref.name)
    if ref.alias:
        aliases = dict(getattr(model, "aliases", {}) or {})
        if ref.alias not in aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise TrackingError(f"{uri}: registered model {ref.name!r} has no alias {ref.alias!r} "
                                f"(aliases set: {known})")
        version = str(aliases[ref.alias])
    else:
        version = ref.version
    try:
        return client.get_model_version(ref.name, version)
    except MlflowException:
        raise TrackingError(f"{uri}: registered model {ref.name!r} has no version {version}") from None


def get_registered_model(client, name: str):
    """The registered model ``name``, or a TrackingError that says it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code):
            raise TrackingError(f"registered model {name!r} does not exist in the MLflow registry "
                                f"at {client.tracking_uri} (train and register a model first)") from None
        raise TrackingError(f"registered model {name!r}: {err.message}") from None


def alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points to, or None when the alias (or the model) is unset."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return None
    value = (getattr(model, "aliases", {}) or {}).get(alias)
    return str(value) if value is not None else None


def get_run(client, run_id: str, what: str = "run"):
    """Fetch a run; a TrackingError names what the run was supposed to be."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"{what} {run_id!r} does not exist in {client.tracking_uri}") from None


def all_experiment_ids(client) -> list[str]:
    """Every experiment, active or deleted, so that a forward search misses no run."""
    from mlflow.entities import ViewType

    return [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]


def load_json_tag(tags: dict[str, str], key: str, default: Any = None) -> Any:
    """Parse a JSON tag; a non-JSON value comes back as the raw string."""
    if key not in tags:
        return default
    try:
        return json.loads(tags[key])
    except (TypeError, ValueError):
        return tags[key]
