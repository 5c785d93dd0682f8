"""sdpg_megatron: Self-Distilled Policy Gradient on Megatron-Core.

Install the CPU stack with `bash tools/install.sh` (what the README, the Makefile and CI
use). The extras below read the pins of requirements/*.txt; what each set has been through:

- cpu: what tools/install.sh installs (Python 3.11, x86_64) and the test suite runs on.
- gpu: published metadata only. On 2026-12-04 `make check-pins` ran
  `tools/check_pins.py requirements/gpu.txt` (and, with `--resolve`, pip's dry-run resolver)
  for CPython 3.12 on Linux x86_64, manylinux up to glibc 2.35: every pin's Requires-Python
  admits 3.12, no pin's declared requirements exclude another pin, and pip found an
  installable wheel set once transformer-engine-torch (published only as an sdist) was
  replaced by the requirements in its PKG-INFO (output: benchmarks/results/check_pins_gpu.txt).
  Nothing of the GPU set was installed, built or run on a GPU: transformer-engine-torch was
  not compiled, and torch 2.14.0 / TE 2.11.0 / vllm 0.33.0 have not run here (the GPU runs in
  benchmarks/gpu used torch 2.11.0+cu130 and megatron-core 0.16.1, without TE or vLLM).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="sdpg_megatron",
    version="0.1.0",
    description="SDPG (Self-Distilled Policy Gradient) RL post-training recipe on Megatron-Core",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["sdpg_megatron", "sdpg_megatron.*"]),
    install_requires=["torch>=2.6", "numpy", "packaging"],
    extras_require={
        # CPU: tests, CI and the embedded demo (torch==2.13.0+cpu installed first).
        "cpu": ["torch==2.13.0"] + _requirements("cpu.txt"),
        # GPU: requirements/gpu.txt as is (metadata-checked only, see above). Install torch==2.14.0
        # first and use --no-build-isolation, so transformer-engine-torch compiles against it.
        "gpu": _requirements("gpu.txt"),
        "dev": ["pytest==9.2.0"],
    },
)
