"""The guard tagger (paper §3.3): a Llama Guard 3 model judges every reasoning step.

One run, one set of guard engines: :func:`start_guards` creates ``distill.guard_engine.concurrency``
actors when the run starts, each loading the guard model once; every pass of the distillation
graph reaches them through one Ray Data stage, :class:`GuardStage`, and :func:`stop_guards`
ends them with the run. So the model loads once per run, not once per chunk, and it loads
while the teacher does.

Each step is judged in context: the request is the user's prompt and the reasoning so far,
ending with that step (:func:`guard_conversations`). Llama Guard rates the last turn of a
conversation, so a step that only makes sense after the ones before it is judged with them.

Row schema through the stage (the finalize stage's output, see :mod:`r2d.distill.stages`)::

    {prompt_id, kind: keep|drop|error|held, record: JSON, ...}
    -> GuardStage   keep records get step_pivots from the guard; + guard_engine (the actor's id)
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import numpy as np

from r2d.distill.tagging import guard_pivot
from r2d.llama_guard import llama_guard_messages

_COLUMN = "guard_messages"


def guard_conversations(row: dict) -> list[list[dict]]:
    """One guard request per step: the prompt, then the reasoning so far ending with that step."""
    steps = [str(s) for s in row["reasoning_steps"]]
    return [llama_guard_messages(str(row["prompt"]), "\n".join(steps[: i + 1]), visible_only=False)
            for i in range(len(steps))]


def apply_verdicts(row: dict, verdicts: list[tuple[str, str]]) -> dict:
    """The row with one pivot per step from the guard's (output, error) pairs; failures are [RETHINK]."""
    return {**row, "step_pivots": [guard_pivot(text, error) for text, error in verdicts]}


class GuardEngine:
    """A Ray actor that holds one guard engine for a whole run (see :func:`start_guards`)."""

    def __init__(self, model, engine, sampling) -> None:
        import os

        from r2d.engines.generate import in_process_generator

        self.generate = in_process_generator(model, engine, sampling, prompt_column=_COLUMN)
        self.name = f"guard-{os.getpid()}"

    def ready(self) -> str:
        return self.name

    def verdicts(self, conversations: list[list[dict]]) -> tuple[str, list[tuple[str, str]]]:
        """(this engine's name, (output, error) per conversation)."""
        cells = np.empty(len(conversations), dtype=object)
        for i, conversation in enumerate(conversations):
            cells[i] = conversation
        out = self.generate({_COLUMN: cells})
        return self.name, [(str(t), str(e)) for t, e in zip(out["generated_text"], out["gen_error"])]


def start_guards(cfg) -> list:
    """Create the run's guard actors; their engines load while the teacher's graph starts."""
    import ray

    from r2d.engines.vllm_engine import vllm_runtime_env
    from r2d.placement import actor_options

    d = cfg.distill
    # Greedy and short: the verdict is "safe" or "unsafe" and a category list.
    sampling = dataclasses.replace(d.sampling, temperature=0.0, max_tokens=16, repetition_penalty=1.0)
    options = actor_options(d.guard_engine)
    if d.guard_engine.kind == "vllm":
        env = vllm_runtime_env(d.guard_engine)
        if d.guard_engine.num_gpus == 0:
            # The teacher's engine is bound to the first cores; binding this one there too would stack them.
            env["env_vars"].update(VLLM_CPU_OMP_THREADS_BIND="nobind",
                                   OMP_NUM_THREADS=str(max(1, int(d.guard_engine.num_cpus))))
        options["runtime_env"] = env
    actor = ray.remote(GuardEngine).options(**options)
    return [actor.remote(d.guard, d.guard_engine, sampling) for _ in range(d.guard_engine.concurrency)]


def stop_guards(guards: list) -> None:
    import ray

    for guard in guards:
        ray.kill(guard)


class GuardStage:
    """Ray Data stage: re-tag the kept traces of each batch with the run's guard engines."""

    def __init__(self, guards: list) -> None:
        self.guards = guards

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import ray

        records = [json.loads(r) for r in batch["record"]]
        todo = [i for i, kind in enumerate(batch["kind"]) if kind == "keep" and records[i]["reasoning_steps"]]
        conversations = [guard_conversations(records[i]) for i in todo]
        engine = ""
        if todo:
            engine, verdicts = ray.get(random.choice(self.guards).verdicts.remote(
                [c for convs in conversations for c in convs]))
            start = 0
            for i, convs in zip(todo, conversations):
                records[i] = apply_verdicts(records[i], verdicts[start:start + len(convs)])
                start += len(convs)
        tagged = set(todo)
        out = dict(batch)
        out["record"] = np.array([json.dumps(r, default=str) for r in records], dtype=object)
        out["guard_engine"] = np.array([engine if i in tagged else "" for i in range(len(records))], dtype=object)
        return out
