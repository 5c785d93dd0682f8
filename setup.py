"""sdpg_megatron: Self-Distilled Policy Gradient on Megatron-Core.

Install the CPU stack with `bash tools/install.sh` (what the README, the Makefile and CI
use). The extras below record the tested pins for each platform; see README.md for the
GPU matrix.
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
        # GPU: CUDA torch, TE and vLLM; see README.md for the tested matrix.
        "gpu": _requirements("gpu.txt"),
        "dev": ["pytest==9.2.0"],
    },
)
