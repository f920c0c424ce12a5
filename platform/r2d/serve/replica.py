"""What every engine replica shares: the ingress's non-generation calls, and how a model is (re)loaded.

A reload (:class:`Reloader`, the alias poller and ``/admin/reload`` alike):

1. one at a time: a reload asked for while one runs waits for it and shares its result;
2. load the new version beside the old one, then **warm it up** (one real generation)
   before it takes traffic; the old model serves until the swap and after any failure;
3. a version that fails to load or warm up is recorded on its MLflow model version
   (tag :data:`LOAD_ERROR_TAG`), and the poller never retries it (``/admin/reload`` may,
   by hand); other failures (the registry unreachable) back the poller off, doubling;
4. a version that answered (its first generation, or a reload's warm-up) is remembered on
   the registered model (:data:`LAST_GOOD_TAG`),
   so that a replica that starts while the alias names a failed version serves the last
   good one instead of crash-looping on the bad one.

An engine supplies ``version``, ``info()``, ``load(version)``, ``warm(loaded)``,
``swap(loaded) -> old``, ``retire(old)`` and ``discard(loaded)``; everything else is here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

log = logging.getLogger("r2d.serve")
LOAD_ERROR_TAG = "r2d.serve.load_error"
"""On a model version: why serving replicas refused it (JSON: error, at). Delete it to let them try again."""
LAST_GOOD_TAG = "r2d.serve.last_good"
"""On a registered model: JSON {alias: version} of the last version a replica served for that alias."""
_MAX_BACKOFF_S = 3600.0


class ReloadError(RuntimeError):
    """A new version could not be loaded or warmed up; the old one still serves."""


class EngineCalls:
    """What the ingress asks of a backend replica besides generation, passed to ``self.engine``."""

    engine: object

    async def info(self) -> dict:
        return self.engine.info()

    async def warmup(self) -> bool:
        return await self.engine.warmup()

    async def reload(self, force: bool = False) -> dict:
        return await self.engine.reload(force)


# ---------------------------------------------------------------- registry records

def _model_ref(source: str):
    """The parsed ``models:/`` URI, or None for folders and hub ids."""
    from r2d.tracking import TrackingError, parse_model_uri

    try:
        return parse_model_uri(source)
    except TrackingError:
        return None


def _registry_version(version: str) -> tuple[str, str] | None:
    """(name, number) of a pinned ``models:/name/N`` source; None for anything else."""
    ref = _model_ref(version)
    return (ref.name, ref.version) if ref is not None and ref.version else None


def load_error(version: str) -> str | None:
    """The recorded reason replicas refused this version, or None (also when the registry cannot say)."""
    pinned = _registry_version(version)
    if pinned is None:
        return None
    try:
        from mlflow import MlflowClient

        return (MlflowClient().get_model_version(*pinned).tags or {}).get(LOAD_ERROR_TAG)
    except Exception as err:
        log.warning("cannot read %s of %s: %s", LOAD_ERROR_TAG, version, err)
        return None


def record_load_error(version: str, err: BaseException) -> None:
    """Tag the version with why it was refused (never raises: the old model must keep serving)."""
    pinned = _registry_version(version)
    if pinned is None:
        return
    try:
        from mlflow import MlflowClient

        value = json.dumps({"error": f"{type(err).__name__}: {err}"[:4000], "at": int(time.time())})
        MlflowClient().set_model_version_tag(*pinned, LOAD_ERROR_TAG, value)
    except Exception as tag_err:
        log.warning("cannot record the load failure of %s: %s", version, tag_err)


def _alias(source: str) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/name@alias`` source; None for anything else."""
    ref = _model_ref(source)
    return (ref.name, ref.alias) if ref is not None and ref.alias else None


def last_good(source: str) -> str | None:
    """The pinned version a replica last served for this ``models:/name@alias`` source, if recorded."""
    named = _alias(source)
    if named is None:
        return None
    try:
        from mlflow import MlflowClient

        raw = (MlflowClient().get_registered_model(named[0]).tags or {}).get(LAST_GOOD_TAG)
        number = json.loads(raw).get(named[1]) if raw else None
    except Exception as err:
        log.warning("cannot read %s of %s: %s", LAST_GOOD_TAG, source, err)
        return None
    return f"models:/{named[0]}/{number}" if number else None


def record_good(source: str, version: str) -> None:
    """Remember that ``version`` served for ``source``'s alias (never raises)."""
    named, pinned = _alias(source), _registry_version(version)
    if named is None or pinned is None:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        raw = (client.get_registered_model(named[0]).tags or {}).get(LAST_GOOD_TAG)
        table = json.loads(raw) if raw else {}
        if table.get(named[1]) != pinned[1]:
            table[named[1]] = pinned[1]
            client.set_registered_model_tag(named[0], LAST_GOOD_TAG, json.dumps(table, sort_keys=True))
        if LOAD_ERROR_TAG in (client.get_model_version(*pinned).tags or {}):
            client.delete_model_version_tag(*pinned, LOAD_ERROR_TAG)  # a forced reload proved it loads now
    except Exception as err:
        log.warning("cannot record %s for %s: %s", LAST_GOOD_TAG, source, err)


def load_at_start(source: str, load):
    """Load the version ``source`` names now, or the last good one when that version failed before.

    Args:
        source: the configured model source.
        load: ``load(version) -> loaded`` (the engine's loader).

    Returns:
        (version, loaded).
    """
    from r2d.models import source_version

    version = source_version(source)
    fallback = last_good(source)
    order = [version]
    if fallback and fallback != version:
        known_bad = load_error(version)
        if known_bad:
            log.warning("%s names %s, which replicas refused before (%s); serving the last good %s", source,
                        version, known_bad, fallback)
            order = [fallback]
        else:
            order.append(fallback)
    for i, candidate in enumerate(order):
        try:
            loaded = load(candidate)
        except Exception as err:
            record_load_error(candidate, err)
            if i + 1 == len(order):
                raise
            log.warning("cannot load %s (%s: %s); falling back to %s", candidate, type(err).__name__, err, order[-1])
            continue
        return candidate, loaded
    raise AssertionError("unreachable")


def first_answer(engine) -> None:
    """Called once, when a replica's first generation succeeded: its version becomes the last good one."""
    asyncio.get_running_loop().run_in_executor(None, record_good, engine.source, engine.version)


# ---------------------------------------------------------------- reloads

class Reloader:
    """One reload at a time for an engine; see the module docstring for the policy."""

    def __init__(self, engine, source: str) -> None:
        self.engine, self.source = engine, source
        self.failures = 0
        """Reloads that failed (load or warm-up) since the replica started."""
        self._task: asyncio.Future | None = None

    async def reload(self, force: bool = False) -> dict:
        """Reload if the source names another version (or ``force``); concurrent calls share one reload."""
        if self._task is not None and not self._task.done():
            return {**await asyncio.shield(self._task), "coalesced": True}
        self._task = asyncio.ensure_future(self._reload(force))
        return await asyncio.shield(self._task)

    async def _reload(self, force: bool) -> dict:
        from r2d.models import source_version

        version = await asyncio.to_thread(source_version, self.source)
        if version == self.engine.version and not force:
            return {"reloaded": False, **self.engine.info()}
        if not force:
            refused = await asyncio.to_thread(load_error, version)
            if refused:
                return {"reloaded": False, "refused": version, "reason": refused, **self.engine.info()}
        try:
            loaded = await asyncio.to_thread(self.engine.load, version)
            try:
                await self.engine.warm(loaded)
            except Exception:
                await asyncio.to_thread(self.engine.discard, loaded)
                raise
        except Exception as err:
            self.failures += 1
            log.warning("reload of %s failed, still serving %s: %s: %s", version, self.engine.version,
                        type(err).__name__, err)
            await asyncio.to_thread(record_load_error, version, err)
            raise ReloadError(f"{version} failed to load or warm up ({type(err).__name__}: {err}); "
                              f"still serving {self.engine.version}") from err
        self.engine.retire(self.engine.swap(loaded))
        await asyncio.to_thread(record_good, self.source, version)
        log.warning("model reloaded: now %s", version)
        return {"reloaded": True, **self.engine.info()}


async def poll_reload(reloader: Reloader, every_s: float, backoff_s: float = 30.0) -> None:
    """Follow the source's alias; after a failure wait ``backoff_s``, doubling up to an hour."""
    delay = every_s
    while True:
        await asyncio.sleep(delay)
        try:
            await reloader.reload()
            delay = every_s
        except Exception as err:
            delay = min(_MAX_BACKOFF_S, max(backoff_s, delay * 2))
            log.warning("reload check failed (next in %.0f s): %s", delay, err)
