"""The cluster path, rehearsed: the GPU recipe end to end on an object store and a three-node Ray cluster.

    make rehearse                         # python tests/rehearsal.py [--keep DIR]

``jobs/configs/qwen2.5-7b.yaml`` runs unchanged, with ``jobs/configs/rehearse.yaml`` laid over it
(tiny stand-in models, CPUs for GPUs, small sizes). Everything a user would run on a cloud
cluster runs here, on one machine:

- an S3-protocol server (moto) holding the recipe's own bucket, ``r2d-artifacts``, reached
  only through ``AWS_ENDPOINT_URL`` and the ``AWS_*`` keys, as AWS would be;
- an ``mlflow server`` whose artifacts go to the same bucket (``--artifacts-destination``);
- a head node and two worker nodes, each a ``ray start`` (tests/loopback_cluster.py);
- ``r2d check`` on the recipe, then every stage through ``r2d submit`` (``ray job submit`` with the
  working directory and the git commit): distill (teacher and Llama-Guard stand-in on vLLM, the
  Alpaca source read from a local ``save_to_disk`` copy through its column mapping) -> train (one
  worker on each worker node, checkpoints in the bucket) -> evaluate -> promote -> serve (vLLM with
  the recipe's engine arguments) -> one request through the official ``openai`` client.

The stand-ins are tiny random Llamas built with :func:`r2d.models.make_tiny_llama`; the teacher and
the guard are scripted (their greedy answer is fixed), so the run knows what they say.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loopback_cluster import ROOT, Timeline, node_env, start_cluster
from ports import free_port

RECIPE = "jobs/configs/qwen2.5-7b.yaml"
OVERRIDE = "jobs/configs/rehearse.yaml"
BUCKET = "r2d-artifacts"  # the recipe's own
TRACES = f"s3://{BUCKET}/traces/qwen2.5-7b"
CHECKPOINTS = f"s3://{BUCKET}/checkpoints/r2d-qwen2.5-7b"
EVAL = f"s3://{BUCKET}/eval/qwen2.5-7b"
MLFLOW_ARTIFACTS = f"s3://{BUCKET}/mlflow"
TEACHER_SAYS = ("<think>The request seeks real harm![UNSAFE] Refusing keeps people safe.[SAFE]</think>"
                "Sorry, I cannot help with that")
GUARD_SAYS = "safe"
# Alpaca's columns, as tatsu-lab/alpaca has them: instruction, input, output, text.
ALPACA = [("Give three tips for staying healthy.", "", "Eat well, move daily and sleep enough."),
          ("Translate the sentence into French.", "Good morning, friend.", "Bonjour, mon ami."),
          ("Summarise the paragraph in one sentence.", "Rain fell all day, so the match was postponed.",
           "The match was postponed because of the rain."),
          ("Suggest a name for a bakery.", "", "Rise and Shine Bakery."),
          ("Explain what a prime number is.", "", "A whole number above one whose only divisors are one and itself."),
          ("Write a haiku about autumn.", "", "Red leaves drift and fall / the maple lets go softly / cold wind carries them."),
          ("Convert the temperature to Fahrenheit.", "25 degrees Celsius", "77 degrees Fahrenheit."),
          ("List three uses for baking soda.", "", "Baking, cleaning sinks and deodorising fridges."),
          ("Classify the animal as a mammal or a reptile.", "Iguana", "A reptile."),
          ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
          ("Give an example of a renewable energy source.", "", "Solar power."),
          ("Describe the water cycle briefly.", "", "Water evaporates, condenses into clouds and falls as rain."),
          ("Find the sum of the numbers.", "4, 8, 15", "27."),
          ("Name the capital of Japan.", "", "Tokyo."),
          ("Suggest a weekend activity for a family.", "", "A picnic in the park followed by a board game."),
          ("Explain how to boil an egg.", "", "Simmer it for nine minutes, then cool it in cold water."),
          ("Write a polite email subject line asking for a meeting.", "", "Request: a short meeting next week?"),
          ("Give the opposite of the word.", "generous", "Stingy."),
          ("Recommend a book for learning to cook.", "", "Salt, Fat, Acid, Heat."),
          ("Sort the words alphabetically.", "pear, apple, fig", "apple, fig, pear."),
          ("Explain why the sky looks blue.", "", "Air scatters blue sunlight more than red."),
          ("Write a short thank-you note to a teacher.", "", "Thank you for your patience and encouragement."),
          ("Estimate how long it takes to walk five kilometres.", "", "About an hour."),
          ("Turn the list into a sentence.", "milk, eggs, bread", "We need milk, eggs and bread.")]


def prepare(work: Path) -> None:
    """The tiny stand-in models and the local copy of the Alpaca columns, under ``work``."""
    import datasets

    from r2d.models import make_tiny_llama

    make_tiny_llama(work / "models" / "teacher", script=TEACHER_SAYS, seed=1)
    make_tiny_llama(work / "models" / "guard", script=GUARD_SAYS, seed=2)
    make_tiny_llama(work / "models" / "student", seed=3)
    if not (work / "data" / "alpaca" / "dataset_info.json").exists():
        rows = {"instruction": [r[0] for r in ALPACA], "input": [r[1] for r in ALPACA],
                "output": [r[2] for r in ALPACA], "text": [f"{r[0]} {r[1]} {r[2]}" for r in ALPACA]}
        datasets.Dataset.from_dict(rows).save_to_disk(str(work / "data" / "alpaca"))


@contextlib.contextmanager
def mlflow_server(work: Path, env: dict):
    """A tracking server (sqlite) whose artifacts go to the bucket; yields (its URI, a wait-until-up callable)."""
    port = free_port()
    log = open(work / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", MLFLOW_ARTIFACTS,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"

    def wait_up(timeout: float = 300) -> None:  # a busy 2-core machine takes a while to import mlflow
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"mlflow server exited: {(work / 'mlflow-server.log').read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"mlflow server did not answer within {timeout:.0f} s"
            time.sleep(0.5)

    try:
        yield uri, wait_up
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def environment(work: Path, timeline: Timeline):
    """Object store, tracking server, stand-in models and the cluster, started side by side; yields (cluster, env)."""
    import threading

    from s3_server import s3_environment

    prepared: list = []
    builder = threading.Thread(target=lambda: prepared.append(prepare(work) or True), daemon=True)
    builder.start()
    with s3_environment(BUCKET) as s3:
        timeline.note(f"object store up: {s3['url']} (moto), bucket {BUCKET}")
        base = node_env(work / "state", {**s3["env"], "R2D_REHEARSAL": str(work), "R2D_SERVE_PORT": str(free_port()),
                                         "R2D_CACHE": str(work / "cache"),
                                         # moto answers presigned URLs with a 500 once authentication is on, so
                                         # downloads go through the tracking server rather than straight to S3.
                                         "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"})
        with mlflow_server(work, base) as (uri, wait_up):
            env = {**base, "MLFLOW_TRACKING_URI": uri}
            cluster = start_cluster(work / "cluster", env, timeline)
            try:
                wait_up()
                timeline.note(f"mlflow server up: {uri}, artifacts in {MLFLOW_ARTIFACTS}")
                builder.join(600)
                assert prepared, "building the stand-in models failed (see the log above)"
                timeline.note(f"stand-in models and dataset ready under {work}")
                yield cluster, env
            finally:
                cluster.stop()


def _config_argv() -> list[str]:
    return ["--config", RECIPE, "--config", OVERRIDE]


def _run(cluster, job_id: str, argv: list[str], timeout: float, tick=None) -> tuple[str, str]:
    cluster.submit(job_id, argv)
    status = cluster.wait_job(job_id, timeout, tick=tick)
    return status, cluster.logs(job_id)


def _last_json(logs: str) -> dict:
    start = logs.rindex("\n{") + 1
    return json.JSONDecoder().raw_decode(logs[start:])[0]


def _train_nodes(cluster, seen: set) -> None:
    """Record the nodes Ray Train's workers run on (polled while the training job runs)."""
    from ray.util.state import list_actors

    with contextlib.suppress(Exception):
        for actor in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], timeout=5):
            if "RayTrainWorker" in (actor.class_name or ""):
                seen.add(actor.node_id)


def checkpoint_steps(run_folder: str) -> list[int]:
    """Steps of the checkpoints Ray Train has written under ``run_folder`` (any store)."""
    from r2d import storage as st

    steps = []
    with contextlib.suppress(Exception):
        for uri in st.list_files(run_folder):
            if uri.endswith("/state.json") and "/checkpoint_" in uri:
                with contextlib.suppress(Exception):  # still being written
                    steps.append(json.loads(st.read_text(uri))["step"])
    return sorted(steps)


def _node_killer(cluster, killed: dict, say):
    """Kill worker_b once the first checkpoint is in the bucket, and bring a replacement (the autoscaler's part)."""
    seen: list[float] = []

    def tick() -> None:
        if killed:
            return
        steps = checkpoint_steps(CHECKPOINTS)
        if steps and not seen:
            seen.append(time.monotonic())
        # Ray Train registers a reported checkpoint when it next polls its workers (about every 2 s):
        # a kill before that would restart from nothing instead of from the bucket.
        if steps and time.monotonic() - seen[0] >= 3:
            cluster.kill_node("worker_b")
            killed.update(at_step=max(steps))
            say(f"KILLED node worker_b (SIGKILL to its process group) after checkpoint step {max(steps)} in "
                f"{CHECKPOINTS}")
            cluster.add_worker("worker_c")
    return tick


def rehearse(cluster, env: dict, say=print, kill_a_node: bool = False) -> dict:
    """Every stage of the recipe through ``r2d submit`` on ``cluster``; returns what each produced.

    With ``kill_a_node``, a worker node is SIGKILLed once training's first checkpoint reaches the
    bucket and a replacement node joins: training must still end with its planned steps, resumed
    from that checkpoint (``out["train_fault"]``), and the later stages run on the new node set.

    Raises:
        AssertionError: naming the stage that failed, with the end of its driver log.
    """
    from r2d import storage as st
    from r2d.distill import store
    from r2d.run_tags import GIT_COMMIT, git_commit

    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "MLFLOW_"))})
    out: dict = {"stages": {}}
    commit = git_commit(mark_dirty=True, cwd=str(ROOT))  # what `r2d submit` sends with every job below
    started = time.monotonic()

    def stage(name: str, t0: float, **facts) -> None:
        out["stages"][name] = {"seconds": round(time.monotonic() - t0, 1), **facts}
        say(f"== {name} ({time.monotonic() - t0:.0f} s) " + "  ".join(f"{k}: {v}" for k, v in facts.items()))

    # 0. preflight: r2d check, as a user runs it before `ray up`
    t0 = time.monotonic()
    check = subprocess.run([sys.executable, "-m", "r2d.cli", "check", *_config_argv(), "--nodes", "3"],
                           env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert check.returncode == 0, f"r2d check failed:\n{check.stdout}\n{check.stderr}"
    stage("check", t0, verdict=check.stderr.strip().splitlines()[-1])

    # 1. distill: teacher and guard on vLLM, traces committed chunk by chunk to the bucket
    t0 = time.monotonic()
    status, logs = _run(cluster, "rehearse-distill", ["jobs/distill.py", *_config_argv()], 900)
    assert status == "SUCCEEDED", f"distill: {status}\n{logs[-4000:]}"
    manifest = store.read_manifest(TRACES)
    last = manifest["last_run"]
    assert manifest["rows"] >= 4 and last.get("guard_engines") == 1 and last["chunks"] >= 2, manifest
    stage("distill", t0, traces=TRACES, rows=manifest["rows"], drops=manifest["drops"],
          chunks=len(store.parquet_files(TRACES)), guard_engines=last["guard_engines"],
          step_pivots=manifest["step_pivots"])
    out["manifest"] = manifest

    # 2. train: one worker on each worker node, checkpoints in the bucket, the model registered
    t0, nodes, killed = time.monotonic(), set(), {}
    kill = _node_killer(cluster, killed, say) if kill_a_node else (lambda: None)

    def tick() -> None:
        _train_nodes(cluster, nodes)
        kill()

    status, logs = _run(cluster, "rehearse-train", ["jobs/train_cpo.py", *_config_argv()], 1200, tick=tick)
    assert status == "SUCCEEDED", f"train: {status}\n{logs[-4000:]}"
    report = _last_json(logs)
    assert report["steps"] == report["planned_steps"] and report["checkpoint"].startswith(CHECKPOINTS), report
    assert st.exists(st.join(report["checkpoint"], "state.json")), report["checkpoint"]
    stage("train", t0, steps=report["steps"], worker_nodes=len(nodes), checkpoint=report["checkpoint"],
          model=report["model_uri"])
    out["train"], out["train_nodes"] = report, len(nodes)
    if kill_a_node:
        from mlflow import MlflowClient

        history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(report["mlflow_run_id"],
                                                                              "resumed_from_step")
        out["train_fault"] = {**killed, "resumed_from": int(history[-1].value) if history else None,
                              "retried": any("[FailurePolicy] RETRY" in line for line in logs.splitlines()),
                              "final_step": (checkpoint_steps(CHECKPOINTS) or [None])[-1]}
        say(f"train after the node kill: {report['steps']}/{report['planned_steps']} steps, resumed from checkpoint "
            f"step {out['train_fault']['resumed_from']}")

    # 3. evaluate the challenger; the report goes to the bucket
    t0 = time.monotonic()
    status, logs = _run(cluster, "rehearse-evaluate", ["jobs/evaluate.py", *_config_argv(),
                                                       "--model", "models:/r2d@challenger"], 900)
    assert status == "SUCCEEDED", f"evaluate: {status}\n{logs[-4000:]}"
    report_uri = next(line.split("report: ", 1)[1].strip() for line in logs.splitlines() if line.startswith("report: "))
    assert report_uri.startswith(EVAL) and st.exists(report_uri), report_uri
    stage("evaluate", t0, report=report_uri)
    out["eval_report"] = report_uri

    # 4. promote: the gates decide (a random tiny student is expected to fail them)
    t0 = time.monotonic()
    status, logs = _run(cluster, "rehearse-promote", ["jobs/promote.py", *_config_argv()], 600)
    decision = next((line for line in logs.splitlines() if line.startswith(("PROMOTED", "NOT PROMOTED"))), "")
    assert decision, f"promote: {status}\n{logs[-4000:]}"
    stage("promote", t0, decision=decision)
    out["promotion"] = decision

    # 5. serve on vLLM with the recipe's engine arguments; one request through the openai client
    t0 = time.monotonic()
    port = int(env["R2D_SERVE_PORT"])
    cluster.submit("rehearse-serve", ["jobs/serve.py", *_config_argv()])
    answer = ""
    try:
        deadline = time.monotonic() + 600
        while "ready after" not in cluster.logs("rehearse-serve"):
            status = str(cluster.client().get_job_status("rehearse-serve")).split(".")[-1]
            assert status == "RUNNING" or status == "PENDING", f"serve: {status}\n{cluster.logs('rehearse-serve')[-4000:]}"
            assert time.monotonic() < deadline, "serve: not ready within 600 s"
            time.sleep(2)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=os.environ.get("R2D_API_KEY") or "none")
        # The recipe's mode (hide): clients may not ask for a weaker one. A random tiny student's visible
        # answer may be empty once its reasoning is hidden, so the check is on the tokens it generated.
        reply = client.chat.completions.create(model="r2d", max_tokens=24,
                                               messages=[{"role": "user", "content": "How do I make a cup of tea?"}])
        answer = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0, reply
        out["completion_tokens"] = reply.usage.completion_tokens
    finally:
        cluster.client().stop_job("rehearse-serve")
        cluster.wait_job("rehearse-serve", 120)
    stage("serve", t0, engine="vllm", tokens=out["completion_tokens"], answer=repr(answer[:80]))
    out["answer"] = answer

    # 6. lineage: the registered model names the commit the jobs were submitted from
    from mlflow import MlflowClient

    version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version("r2d", out["train"]["model_version"])
    assert version.tags.get(GIT_COMMIT) == commit, (version.tags.get(GIT_COMMIT), commit)
    artifacts = st.list_files(MLFLOW_ARTIFACTS)
    assert any(f.endswith("model/config.json") for f in artifacts), artifacts[:10]
    say(f"== lineage: model version {version.version} was trained at commit {commit}; "
        f"its weights are in {MLFLOW_ARTIFACTS} ({len(artifacts)} objects)")
    out["git_commit"], out["wall_s"] = commit, round(time.monotonic() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default="", help="work in this folder and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="r2d-rehearsal-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timeline = Timeline(work / "timeline.txt")
    began = time.monotonic()
    with environment(work, timeline) as (cluster, env):
        result = rehearse(cluster, env, say=timeline.note)
    timeline.note(f"rehearsal done in {time.monotonic() - began:.0f} s (stages {result['wall_s']:.0f} s); "
                  f"the answer: {result['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
