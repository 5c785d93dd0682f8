"""The Triton kernels of the fused loss under Triton's interpreter, on CPU.

The cases live in `tests/triton_interpreter_cases.py`. They run in a pytest process of
their own, started with TRITON_INTERPRET=1, because the interpreter has to be on before
Triton is first imported, and the main test process imports Triton long before (through
torch and vLLM). This test passes only if every case ran and passed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "triton_interpreter_cases.py"


def test_kernels_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider", "-rfEs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"interpreter cases failed:\n{output}"
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 22, f"expected all 22 cases to run: {summary}"
    assert not re.search(r"skipped|deselected|xfail", summary), f"every case must run: {summary}"
