"""Reloading a served model from the registry: warm-up first, one at a time, a bad version refused for good.

The transformers engine in-process (no Ray) against the session's sqlite MLflow registry:
the alias moves to versions that fail to load (truncated weights) or load but cannot
generate (a chat template that raises); the old model keeps serving, the failure is
recorded on the version, the poller does not try it again, and a replica that starts
while the alias still names it serves the last good version.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from serve_helpers import broken_copy, register

from r2d.serve.replica import LAST_GOOD_TAG, LOAD_ERROR_TAG, ReloadError, poll_reload
from r2d.serve.schemas import GenRequest
from r2d.serve.transformers_backend import TransformersEngine

pytestmark = pytest.mark.integration
NAME = "r2d-reload-it"
SOURCE = f"models:/{NAME}@champion"


async def _answer(engine) -> str:
    return "".join([d.text async for d in engine.stream_one(GenRequest([{"role": "user", "content": "Hi"}], 4))])


def test_a_bad_version_never_takes_traffic_nor_comes_back(state_dir, tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient()
    v1 = register(tiny_model_dir, NAME, alias="champion")
    engine = TransformersEngine(SOURCE, cache_dir=str(tmp_path / "cache"), max_model_len=256, threads=1)
    loads = []
    real_load = engine.load
    engine.load = lambda version: loads.append(version) or real_load(version)
    good = asyncio.run(_answer(engine))
    assert engine.version == f"models:/{NAME}/{v1}"

    for how in ("weights", "template"):
        bad = register(broken_copy(tiny_model_dir, tmp_path / how, how), NAME, alias="champion")
        with pytest.raises(ReloadError, match=f"models:/{NAME}/{bad} failed to load or warm up"):
            asyncio.run(engine.reload())
        # The old model still serves, and the version carries why it was refused.
        assert engine.version == f"models:/{NAME}/{v1}" and asyncio.run(_answer(engine)) == good
        assert "Error" in json.loads(client.get_model_version(NAME, bad).tags[LOAD_ERROR_TAG])["error"]
        tried = len(loads)

        # The poller sees the alias on the refused version and leaves it alone.
        async def poll_a_while():
            task = asyncio.create_task(poll_reload(engine.reloader, every_s=0.05, backoff_s=0.05))
            await asyncio.sleep(0.5)
            task.cancel()
            return await engine.reload()

        assert asyncio.run(poll_a_while())["refused"] == f"models:/{NAME}/{bad}"
        assert len(loads) == tried and engine.reloader.failures == (1 if how == "weights" else 2)

        # A replica that starts now serves the last good version, not the refused one.
        restarted = TransformersEngine(SOURCE, cache_dir=str(tmp_path / "cache"), max_model_len=256, threads=1)
        assert restarted.version == f"models:/{NAME}/{v1}" and asyncio.run(_answer(restarted)) == good
    assert json.loads(client.get_registered_model(NAME).tags[LAST_GOOD_TAG]) == {"champion": v1}


def test_concurrent_reloads_share_one_load_and_warm_up_first(state_dir, tiny_model_dir, tmp_path):
    name = "r2d-reload-it-2"
    v1 = register(tiny_model_dir, name, alias="champion")
    engine = TransformersEngine(f"models:/{name}@champion", cache_dir=str(tmp_path / "cache"), max_model_len=256,
                                threads=1)
    events = []
    real_load, real_warm, real_swap = engine.load, engine.warm, engine.swap
    engine.load = lambda version: events.append("load") or real_load(version)

    async def warm(loaded):
        events.append("warm")
        await real_warm(loaded)

    engine.warm = warm
    engine.swap = lambda loaded: events.append("swap") or real_swap(loaded)
    v2 = register(tiny_model_dir, name, alias="champion")

    async def three_at_once():
        return await asyncio.gather(engine.reload(), engine.reload(), engine.reload(force=True))

    results = asyncio.run(three_at_once())
    assert events == ["load", "warm", "swap"]  # one reload, warmed up before it took traffic
    assert [r["reloaded"] for r in results] == [True, True, True] and sum(bool(r.get("coalesced")) for r in results) == 2
    assert engine.version == f"models:/{name}/{v2}" != f"models:/{name}/{v1}"
