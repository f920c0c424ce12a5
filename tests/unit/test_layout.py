"""Guards for the layout: `platform/` must never become a package that shadows the standard library."""

import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_no_platform_init():
    assert not (ROOT / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib `platform`"


def test_platform_is_stdlib_under_pytest():
    import platform

    assert Path(platform.__file__).resolve().parent == STDLIB
    assert callable(platform.system)


def test_platform_is_stdlib_from_repo_root_subprocess():
    """A plain `python` started in the repo root (as `ray job submit --working-dir .` does) still sees the stdlib."""
    code = "import platform, r2d; print(platform.__file__); print(r2d.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    platform_file, r2d_file = out.stdout.split()
    assert Path(platform_file).resolve().parent == STDLIB
    assert Path(r2d_file).resolve().is_relative_to(ROOT / "platform" / "r2d")


def test_r2d_found_under_platform():
    spec = importlib.util.find_spec("r2d")
    assert spec is not None and Path(spec.origin).resolve().parent == ROOT / "platform" / "r2d"


def test_layout_folders_exist():
    for name in ("platform/r2d", "pipelines", "jobs/configs", "tests/unit", "tests/integration", "tests/gpu",
                 "pyproject.toml", "cluster.yaml", "Makefile", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), name
