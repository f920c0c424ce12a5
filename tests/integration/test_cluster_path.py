"""The cluster path on one machine: the GPU recipe rehearsed end to end, and the faults a cluster has.

One module-wide stack: an S3-protocol server (moto) with the recipe's bucket, an ``mlflow server``
whose artifacts go there, and a Ray cluster of a head and two worker nodes (tests/loopback_cluster.py).
Every job goes in through ``r2d submit`` (``ray job submit``). Then:

1. the rehearsal (tests/rehearsal.py; ``make rehearse`` runs the same): qwen2.5-7b.yaml unchanged plus
   rehearse.yaml, distill -> train -> evaluate -> promote -> serve -> one ``openai`` request;
2. distillation on the object store: a second driver of the same output is refused (the lease); the
   first driver is SIGKILLed after a committed chunk; the resubmitted job loses and repeats nothing;
3. training with checkpoints on the object store: a worker node is SIGKILLed after a checkpoint, a
   replacement joins, and the run ends with the planned steps, resumed from the bucket.

The timeline (what was submitted, killed and resumed, and when) is printed (``-s`` or ``-rA``) and saved
as ``timeline.txt`` in the module's tmp dir. Skip the module with ``R2D_SKIP_MULTINODE=1``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("R2D_SKIP_MULTINODE") == "1", reason="R2D_SKIP_MULTINODE=1"),
]

FAULT_TRACES = "s3://r2d-artifacts/faults/traces"
FAULT_CHECKPOINTS = "s3://r2d-artifacts/faults/checkpoints"


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
    result = rehearse(stack["cluster"], stack["env"], say=stack["timeline"].note)
    stack["timeline"].note(f"rehearsal: {time.monotonic() - started:.0f} s for the stages "
                           f"{ {k: v['seconds'] for k, v in result['stages'].items()} }")
    assert list(result["stages"]) == ["check", "distill", "train", "evaluate", "promote", "serve"]
    assert result["train_nodes"] == 2, "training did not use both worker nodes"
    assert result["manifest"]["step_pivots"].get("[SAFE]") and not result["manifest"]["step_pivots"].get("[UNSAFE]"), \
        "the guard (scripted to answer 'safe') did not tag the steps"
    assert result["answer"].strip()


# ---------------------------------------------------------------- faults


def _fault_overrides(work, extra: list[str] = ()) -> list[str]:
    student = work / "models" / "student"
    return [f"model.source={student}", f"distill.teacher.source={student}", f"distill.output_dir={FAULT_TRACES}",
            "data.heldout_categories=[]", "distill.max_prompts=24", "distill.chunk_size=4",
            "distill.max_regenerations=0", "distill.lease_ttl_s=20",
            "distill.engine={kind: transformers, batch_size: 4, concurrency: 2, num_cpus: 1}",
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
    timeline.note("second driver refused: " + next(line for line in refused.splitlines() if "LeaseError" in line)[:200])


def test_distillation_on_the_object_store_survives_a_killed_driver(stack):
    """SIGKILL the driver after a committed chunk; the resubmitted job loses and repeats nothing."""
    from r2d.config import load_config
    from r2d.data.splits import select_balanced, training_prompts
    from r2d.distill import store

    cl, work, timeline = stack["cluster"], stack["work"], stack["timeline"]
    overrides = _fault_overrides(work)
    argv = ["jobs/distill.py", "--config", "jobs/configs/tiny.yaml", *overrides]
    cfg = load_config("jobs/configs/tiny.yaml", overrides)
    expected = {p["prompt_id"] for p in select_balanced(training_prompts(cfg), cfg.distill.max_prompts)}
    cl.submit("fault-distill-1", argv)

    # 1. SIGKILL the first driver once a chunk is committed, before the run ends
    killed: dict = {}

    def kill_after_a_commit() -> None:
        committed = _committed(FAULT_TRACES)
        if killed or not committed:
            return
        pid = cl.driver_pid("fault-distill-1")
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, committed=committed, rows=len(store.written_ids(FAULT_TRACES)))
            timeline.note(f"KILLED the distillation driver (pid {pid}) with {committed} chunk(s), "
                          f"{killed['rows']}/{len(expected)} prompt_ids committed")

    status = cl.wait_job("fault-distill-1", 600, tick=kill_after_a_commit)
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
    assert len(rows) >= 8, "too few traces for the training fault test"


def _checkpoint_steps(run_folder: str) -> list[int]:
    from r2d import storage as st

    steps = []
    try:
        files = [f for f in st.list_files(run_folder) if f.endswith("/state.json") and "/checkpoint_" in f]
    except Exception:
        return []
    for uri in files:
        try:
            steps.append(json.loads(st.read_text(uri))["step"])
        except Exception:
            continue  # still being written
    return sorted(steps)


def test_training_on_the_object_store_survives_a_killed_worker_node(stack):
    from r2d.distill import store

    cl, work, timeline = stack["cluster"], stack["work"], stack["timeline"]
    if not store.exists(FAULT_TRACES):
        pytest.skip("needs the traces written by the distillation fault test")
    planned, every, run_name = 12, 3, "fault-train"
    run_folder = f"{FAULT_CHECKPOINTS}/{run_name}"
    overrides = [*_fault_overrides(work), f"train.max_steps={planned}", f"train.checkpoint_every={every}",
                 "train.batch_size=2", "train.grad_accum=1", "train.max_length=256",
                 f"train.storage_path={FAULT_CHECKPOINTS}", f"train.run_name={run_name}", "train.max_failures=2",
                 "resources.train_workers=2", "resources.cpus_per_worker=2", "tracking.registered_model=r2d-faults"]
    killed: dict = {}

    def kill_worker_node() -> None:
        if killed:
            return
        steps = _checkpoint_steps(run_folder)
        if not steps:
            return
        cl.kill_node("worker_b")
        killed.update(at_step=max(steps))
        timeline.note(f"KILLED node worker_b (SIGKILL to its process group) after checkpoint step {max(steps)} "
                      f"of {planned} in {run_folder}")
        cl.add_worker("worker_c")  # the autoscaler's part: a replacement node

    cl.submit("fault-train", ["jobs/train_cpo.py", "--config", "jobs/configs/tiny.yaml", *overrides])
    status = cl.wait_job("fault-train", 900, tick=kill_worker_node)
    logs = cl.logs("fault-train")
    assert killed, f"training ended before the first checkpoint could be observed:\n{logs[-2000:]}"
    assert status == "SUCCEEDED", logs[-4000:]
    report = json.loads(logs[logs.rindex("\n{") + 1:].split("\n}")[0] + "\n}")
    from mlflow.tracking import MlflowClient

    history = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"]).get_metric_history(report["mlflow_run_id"],
                                                                                    "resumed_from_step")
    resumed = int(history[-1].value) if history else None
    timeline.note(f"train finished: {report['steps']}/{report['planned_steps']} steps, resumed from checkpoint "
                  f"step {resumed}, final checkpoint {report['checkpoint']}")
    assert any("[FailurePolicy] RETRY" in line for line in logs.splitlines()), "Ray Train did not retry"
    assert report["steps"] == report["planned_steps"] == planned
    assert resumed is not None and killed["at_step"] <= resumed < planned, resumed
    assert report["checkpoint"].startswith(run_folder) and _checkpoint_steps(run_folder)[-1] == planned
