"""Chunks are committed while the engine is still generating, even when its actors hold every CPU.

Two bugs made a long distillation commit nothing until its very end, so a crash lost hours:
the driver read rows through ``iter_rows``, whose prefetch window holds a finished block back
until later ones exist, and each commit asked Ray for a CPU that the engine actors held.
"""

from __future__ import annotations

import threading
import time

import pytest

from r2d.distill import store
from pipelines.distill import _chunks

pytestmark = pytest.mark.integration


def _first_within(gen, seconds: float):
    got: list = []
    thread = threading.Thread(target=lambda: got.append(next(gen)), daemon=True)
    thread.start()
    thread.join(seconds)
    return got[0] if got else None


def test_first_chunk_arrives_while_later_blocks_are_still_running(ray_session, tmp_path):
    release = tmp_path / "release"

    def release_after_first(batch):  # defined here, so Ray ships it by value to its workers
        """Block 0 passes at once; every later block waits until the test creates ``release``."""
        if int(batch["id"][0]) != 0:
            deadline = time.time() + 120
            while not release.exists() and time.time() < deadline:
                time.sleep(0.05)
        return batch

    ds = ray_session.data.range(12, override_num_blocks=3).map_batches(release_after_first, batch_size=None,
                                                                       num_cpus=0.5)
    gen = _chunks(ds, 4)
    first = _first_within(gen, 60)
    release.touch()
    rest = [row for chunk in gen for row in chunk]
    assert first is not None, "the first block was held back until the later blocks were done"
    assert [r["id"] for r in first] == [0, 1, 2, 3]
    assert sorted(r["id"] for r in first + rest) == list(range(12))


def test_a_commit_needs_no_cpu_while_the_engine_holds_them_all(ray_session, tmp_path):
    @ray_session.remote(num_cpus=1)
    class Engine:
        def ready(self):
            return True

    total = int(ray_session.cluster_resources()["CPU"])
    holders = [Engine.remote() for _ in range(total)]  # they start once earlier tests' workers are gone
    ray_session.get([h.ready.remote() for h in holders], timeout=120)
    assert ray_session.available_resources().get("CPU", 0) == 0
    try:
        row = {"prompt_id": "p1", "prompt": "hi", "source": "benign", "label": "benign", "attack": "none",
               "teacher": "t", "system_prompt_id": "s", "reasoning_steps": ["a"], "step_pivots": ["[SAFE]"],
               "teacher_pivots": [""], "answer": "ok", "answer_pivot": "[SAFE]", "tagger": "rules",
               "repaired": False, "n_tokens": 3, "created_at": store.now(), "origin": "teacher",
               "request": ""}
        done = threading.Thread(target=store.commit_chunk, args=([row], [], [], tmp_path, "t-00000"), daemon=True)
        done.start()
        done.join(60)
        assert not done.is_alive(), "the commit is waiting for a CPU the engine actors hold"
        assert store.read_table(tmp_path, ["prompt_id"]).column("prompt_id").to_pylist() == ["p1"]
    finally:
        for h in holders:
            ray_session.kill(h)
