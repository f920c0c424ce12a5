"""`import platform` must resolve to the standard library inside Ray workers too."""

import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_platform_is_stdlib_in_ray_worker(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def where():
        import platform

        import r2d

        return platform.__file__, platform.system(), r2d.__file__

    platform_file, system, r2d_file = ray.get(where.remote())
    assert Path(platform_file).resolve().parent == Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert system == "Linux"
    assert r2d_file.endswith("r2d/__init__.py")
