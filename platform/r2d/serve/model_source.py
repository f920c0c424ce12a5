"""Which model version a source points at now, so that a replica can tell when to reload.

``models:/name@alias`` resolves to the registry version the alias names (cheap: one
registry call, no download); ``models:/name/3`` to that version; any other source is
its own version (a folder, a GGUF file, a hub id).
"""

from __future__ import annotations

from r2d.models import ModelSourceError


def source_version(source: str) -> str:
    """A string that changes exactly when the source would load a different model.

    Raises:
        ModelSourceError: when a registry source cannot be resolved.
    """
    if not source.startswith("models:/"):
        return source
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    body = source[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        else:
            name, _, version = body.partition("/")
            version = MlflowClient().get_model_version(name, version).version
    except MlflowException as err:
        raise ModelSourceError(f"{source}: cannot resolve in the MLflow registry: {err.message}") from err
    return f"models:/{name}/{version}"
