"""The import rule of docs/architecture.md, read from the source (every import, lazy ones included).

Stages in the order the data flows — data, distill, train, eval, registry, serve — each import
only earlier stages and the shared leaves; the leaves import only leaves; the Ray Data graphs in
pipelines/ sit with the stage that runs them; the command-line front (r2d.cli, r2d.demo_report)
may import any stage; nothing imports jobs/ or benchmarks/; and there are no import cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LEAVES = ("r2d", "r2d.config", "r2d.pivots", "r2d.losses", "r2d.models", "r2d.runtime", "r2d.refusal",
          "r2d.llama_guard", "r2d.run_tags", "r2d.tracking", "r2d.placement", "r2d.storage", "r2d.commits", "r2d.engines",
          "pipelines", "pipelines.generate")
STAGES = ("r2d.data", "r2d.distill", "r2d.train", "r2d.eval", "r2d.registry", "r2d.serve")
PIPELINE_STAGE = {"pipelines.distill": "r2d.distill"}
FRONT = ("r2d.cli", "r2d.demo_report")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "platform" if path.is_relative_to(ROOT / "platform") else ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*(ROOT / "platform" / "r2d").rglob("*.py"), *(ROOT / "pipelines").glob("*.py"),
             *(ROOT / "jobs").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    return {module_name(f): f for f in files}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to the longest name it names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def project_imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a ``from pkg import name`` counts when name is a module)."""
    out = {}
    for mod, path in mods.items():
        targets = set()
        for name in imports_of(path):
            if name in mods:
                targets.add(name)
            elif name.rsplit(".", 1)[0] in mods and name.split(".")[0] in ("r2d", "pipelines", "jobs", "benchmarks"):
                targets.add(name.rsplit(".", 1)[0])
        out[mod] = targets - {mod}
    return out


def owner(mod: str) -> str:
    """The layer a module belongs to: a leaf, a stage, the front, pipelines, jobs or benchmarks."""
    if mod in PIPELINE_STAGE:
        return PIPELINE_STAGE[mod]
    for name in (*STAGES, *FRONT):
        if mod == name or mod.startswith(name + "."):
            return name
    for name in LEAVES:
        if mod == name or (name not in ("r2d", "pipelines") and mod.startswith(name + ".")):
            return "leaf"
    return mod.split(".")[0]


def rank(layer: str) -> int:
    if layer == "leaf":
        return 0
    if layer in STAGES:
        return 1 + STAGES.index(layer)
    return {"r2d.cli": 10, "r2d.demo_report": 10, "jobs": 20, "benchmarks": 20}[layer]


MODS = sources()
GRAPH = project_imports(MODS)


def test_every_library_module_has_a_layer():
    unknown = [m for m in MODS if owner(m) not in ("leaf", *STAGES, *FRONT, "jobs", "benchmarks")]
    assert not unknown, f"modules outside every layer (add them to the rule): {unknown}"


@pytest.mark.parametrize("mod", sorted(m for m in MODS if m.startswith(("r2d", "pipelines"))))
def test_imports_point_down(mod):
    """A module imports its own layer, earlier stages and the leaves; never a later stage."""
    mine = owner(mod)
    bad = [t for t in sorted(GRAPH[mod]) if rank(owner(t)) > rank(mine)
           or (rank(owner(t)) == rank(mine) and owner(t) != mine)]
    assert not bad, f"{mod} ({mine}) imports later layers: {[(t, owner(t)) for t in bad]}"


def test_nothing_imports_jobs_or_benchmarks():
    bad = [(m, t) for m, targets in GRAPH.items() for t in targets
           if owner(t) in ("jobs", "benchmarks") and owner(m) != owner(t)]
    assert not bad, bad


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for mod in sorted(GRAPH):
        if mod not in state:
            visit(mod, [mod])
    # A package's __init__ re-exporting its own modules is not a cycle between modules.
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, f"import cycles: {real}"


def test_jobs_do_not_edit_sys_path():
    for path in [*(ROOT / "jobs").glob("*.py"), *(ROOT / "pipelines").glob("*.py")]:
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path; import the installed packages"


def test_the_rule_sees_a_violation():
    """The checker itself: a leaf that imported a stage, or a stage that imported a later one, is caught."""
    assert rank(owner("r2d.eval.runner")) > rank(owner("r2d.refusal"))
    assert rank(owner("r2d.serve.api")) > rank(owner("r2d.registry.promote")) > rank(owner("r2d.eval.judges"))
    assert owner("pipelines.distill") == "r2d.distill" and owner("pipelines.generate") == "leaf"
    assert owner("r2d.config.schema") == "leaf" and owner("r2d.engines.vllm_engine") == "leaf"
