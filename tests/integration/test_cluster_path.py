"""The cluster path on one machine: the GPU recipe rehearsed end to end, and the faults a cluster has.

One module-wide stack: an S3-protocol server (moto) with the recipe's bucket, an ``mlflow server``
whose artifacts go there, and a Ray cluster of a head and two worker nodes (tests/loopback_cluster.py).
Every job goes in through ``r2d submit`` (``ray job submit``). Then:

1. the rehearsal (tests/rehearsal.py; ``make rehearse`` runs the same): qwen2.5-7b.yaml unchanged plus
   rehearse.yaml, distill -> train -> evaluate -> promote -> serve -> one ``openai`` request. Its
   training is the node fault: a worker node is SIGKILLed once the first checkpoint is in the bucket,
   a replacement joins, and the run must end with the planned steps, resumed from the bucket (a
   training job of its own would cost the suite minutes of start-up for nothing more);
2. distillation on the object store: a second driver of the same output is refused (the lease); a
   driver is SIGKILLed after a committed chunk; the resubmitted job loses and repeats nothing.

The timeline (what was submitted, killed and resumed, and when) is printed (``-s`` or ``-rA``) and saved
as ``timeline.txt`` in the module's tmp dir. Skip the module with ``R2D_SKIP_MULTINODE=1``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("R2D_SKIP_MULTINODE") == "1", reason="R2D_SKIP_MULTINODE=1"),
]

FAULT_TRACES = "s3://r2d-artifacts/faults/traces"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from loopback_cluster import Timeline
    from rehearsal import environment

    work = tmp_path_factory.mktemp("cluster-path")
    timeline = Timeline(work / "timeline.txt")
    saved = dict(os.environ)
    try:
        with environment(work, timeline) as (cluster, env):
            yield {"cluster": cluster, "env": env, "work": work, "timeline": timeline, "results": {}}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        timeline.note("stack stopped")
        print(f"\ntimeline ({work / 'timeline.txt'}):\n{timeline}")


def test_the_gpu_recipe_rehearsed_end_to_end(stack):
    from rehearsal import rehearse

    started = time.monotonic()
    result = rehearse(stack["cluster"], stack["env"], say=stack["timeline"].note, kill_a_node=True)
    stack["results"]["rehearsal"] = result
    stack["timeline"].note(f"rehearsal: {time.monotonic() - started:.0f} s for the stages "
                           f"{ {k: v['seconds'] for k, v in result['stages'].items()} }")
    assert list(result["stages"]) == ["check", "distill", "train", "evaluate", "promote", "serve"]
    assert result["train_nodes"] >= 2, "training did not use both worker nodes"
    assert result["manifest"]["step_pivots"].get("[SAFE]") and not result["manifest"]["step_pivots"].get("[UNSAFE]"), \
        "the guard (scripted to answer 'safe') did not tag the steps"
    # A random tiny student's words are noise; that it answered through the API, on vLLM, is the point.
    assert isinstance(result["answer"], str) and result["completion_tokens"] > 0


# ---------------------------------------------------------------- faults


def _fault_overrides(work, extra: list[str] = ()) -> list[str]:
    student = work / "models" / "student"
    return [f"model.source={student}", f"distill.teacher.source={student}", f"distill.output_dir={FAULT_TRACES}",
            "data.heldout_categories=[]", "distill.max_prompts=48", "distill.chunk_size=2",
            "distill.max_regenerations=0", "distill.lease_ttl_s=20",
            "distill.engine={kind: transformers, batch_size: 4, concurrency: 1, num_cpus: 1}",
            "distill.sampling.max_tokens=16", *extra]


def _committed(out: str) -> int:
    from r2d import commits

    try:
        return len(commits.committed_chunks(out))
    except Exception:
        return 0


def test_a_second_driver_of_the_same_output_is_refused(stack):
    """While a live driver holds the output's lease (renewing it), a submitted distillation fails on it.

    The live driver is this test process, holding the lease as a distillation driver on another
    node would: a second real job would race the first to its end, this one cannot.
    """
    from r2d import commits

    cl, work, timeline = stack["cluster"], stack["work"], stack["timeline"]
    argv = ["jobs/distill.py", "--config", "jobs/configs/tiny.yaml", *_fault_overrides(work)]
    with commits.HeldLease(FAULT_TRACES, owner="driver-on-another-node", ttl_s=20):
        cl.submit("fault-distill-second", argv)
        status = cl.wait_job("fault-distill-second", 300)
    refused = cl.logs("fault-distill-second")
    assert status == "FAILED" and "LeaseError" in refused and "a live driver" in refused, refused[-3000:]
    assert _committed(FAULT_TRACES) == 0, "the refused driver committed something"
    timeline.note("second driver refused: " + [line for line in refused.splitlines() if "LeaseError:" in line][-1][:240])


def test_distillation_on_the_object_store_survives_a_killed_driver(stack):
    """SIGKILL the driver after a committed chunk; the resubmitted job loses and repeats nothing."""
    from r2d import commits
    from r2d import storage as st
    from r2d.config import load_config
    from pipelines.distill import training_set
    from r2d.distill import store

    cl, work, timeline = stack["cluster"], stack["work"], stack["timeline"]
    overrides = _fault_overrides(work)
    argv = ["jobs/distill.py", "--config", "jobs/configs/tiny.yaml", *overrides]
    cfg = load_config("jobs/configs/tiny.yaml", overrides)
    expected = {p["prompt_id"] for p in training_set(cfg)}  # the wrapped share carries its own ids
    cl.submit("fault-distill-1", argv)

    # 1. SIGKILL the first driver once a chunk is committed, before the run ends. The bucket is
    #    watched from a thread of its own, every 20 ms: the engine's output reaches the driver in
    #    bursts, and a watcher paced by the job-status poll saw a whole run commit between two looks.
    killed: dict = {}
    done = threading.Event()

    def kill_after_a_commit() -> None:
        markers, pid = st.join(FAULT_TRACES, commits.COMMITTED), None
        while not done.is_set():
            pid = pid or cl.driver_pid("fault-distill-1")
            try:
                committed = [u for u in st.list_files(markers, recursive=False) if u.endswith(".json")]
            except Exception:
                committed = []
            if pid and committed:
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, committed=len(committed), rows=len(store.written_ids(FAULT_TRACES)))
                timeline.note(f"KILLED the distillation driver (pid {pid}) with {len(committed)} chunk(s), "
                              f"{killed['rows']}/{len(expected)} prompt_ids committed")
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_a_commit, daemon=True)
    watcher.start()
    try:
        status = cl.wait_job("fault-distill-1", 600)
    finally:
        done.set()
        watcher.join(timeout=10)
    assert killed, f"the run ended before its driver could be killed:\n{cl.logs('fault-distill-1')[-2000:]}"
    assert status == "FAILED" and killed["rows"] < len(expected), "the kill came too late to test a resume"
    first = set(store.read_table(FAULT_TRACES, ["prompt_id"]).column("prompt_id").to_pylist())

    # 2. resubmit: the dead driver's lease is taken over, committed prompts are skipped
    cl.submit("fault-distill-3", argv)
    status = cl.wait_job("fault-distill-3", 600)
    assert status == "SUCCEEDED", cl.logs("fault-distill-3")[-4000:]
    rows = store.read_table(FAULT_TRACES, ["prompt_id"]).column("prompt_id").to_pylist()
    drops = [d["prompt_id"] for d in store.read_drops(FAULT_TRACES)]
    manifest = store.read_manifest(FAULT_TRACES)
    timeline.note(f"resumed distillation: {len(rows)} rows + {len(drops)} drops for {len(expected)} prompts; "
                  f"skipped {manifest['last_run']['skipped_existing']} already committed")
    assert len(rows) == len(set(rows)) and len(drops) == len(set(drops)), "a prompt was written twice"
    assert not set(rows) & set(drops), "a prompt both written and dropped"
    assert set(rows) | set(drops) == expected, f"lost: {sorted(expected - set(rows) - set(drops))[:5]}"
    assert first <= set(rows) and manifest["last_run"]["skipped_existing"] >= len(first)


def test_training_on_the_object_store_survived_a_killed_worker_node(stack):
    """The rehearsal's training (qwen2.5-7b.yaml + rehearse.yaml, checkpoints in s3://r2d-artifacts) lost a
    whole worker node after its first checkpoint; Ray Train restored that checkpoint from the bucket on
    the replacement node and ended with the planned steps."""
    result = stack["results"].get("rehearsal")
    if not result:
        pytest.skip("the rehearsal did not get that far")
    fault, report = result["train_fault"], result["train"]
    assert fault.get("at_step"), "training ended before its first checkpoint could be observed"
    assert fault["retried"], "Ray Train did not retry the worker group"
    assert report["steps"] == report["planned_steps"]
    assert fault["resumed_from"] is not None and fault["at_step"] <= fault["resumed_from"] < report["planned_steps"]
    assert fault["final_step"] == report["planned_steps"] and report["checkpoint"].startswith("s3://r2d-artifacts/")
