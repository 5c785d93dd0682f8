# The README's two commands: `make demo` and `make test`. Each installs what it needs
# through tools/install.sh (a no-op once the environment is in place).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export SDPG_VENV := $(abspath $(VENV))

.PHONY: install demo test bench
install:
	bash tools/install.sh

# Until the trainer lands (issue 5), the main job is the fused-loss benchmark.
demo: install
	$(PYTHON) benchmarks/bench_vocab_parallel_loss.py

test: install
	$(PYTHON) -m pytest tests -q

bench: install
	$(PYTHON) benchmarks/bench_vocab_parallel_loss.py
	$(PYTHON) benchmarks/bench_conversion.py
	$(PYTHON) benchmarks/bench_rollout.py
