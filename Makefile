# The two entry points of the README: `make run` and `make test`. Both create .venv on first
# use; torch is pinned by constraints.txt to the CPU build (a bare `torch` pulls CUDA).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installing also builds the native decode kernels once (about a minute), so the first
# `emergence` command does not pay for it.
$(VENV)/.run-deps: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	$(BIN)/python -m emergence.kernels
	touch $@

# llama-cpp-python builds llama.cpp from source (a few minutes on 2 cores): its CPU backend
# only, for this machine's instruction set, without its AMX matmul (which faults with SIGILL
# in OpenMP worker threads on the machines we run on).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'

# The web page's test drives Debian's chromium (through Playwright); installed when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

$(VENV)/.test-deps: pyproject.toml constraints.txt | $(BIN)/python
	$(CHROMIUM)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) -e '.[test]'
	$(BIN)/python -m emergence.kernels
	$(BIN)/python bench/llama_cpp_source.py
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/emergence generate --temperature 0 --max-new-tokens 256

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test-deps
	$(BIN)/python bench/bench_decode.py
	$(BIN)/python bench/bench_quant.py
	$(BIN)/python bench/bench_gguf_load.py
	$(BIN)/python bench/bench_qgemv.py
	$(BIN)/python bench/bench_row_walk.py
	$(BIN)/python bench/bench_onednn.py
	$(BIN)/python bench/bench_batched.py
	$(BIN)/python bench/bench_train.py --device cpu --vocab 65  # the README's CPU settings; on a GPU: --device cuda
	$(BIN)/python bench/bench_finetune.py
	$(BIN)/python bench/bench_serve.py
	$(BIN)/python bench/bench_serve.py --model emergence-6m
	$(PIP) sse-starlette starlette-context pydantic-settings  # llama-cpp-python's server, a peer below
	$(BIN)/python bench/bench_serve_peers.py
	$(BIN)/python bench/bench_prefix.py
	$(BIN)/python bench/soak_serve.py
	$(BIN)/python bench/bench_paged.py
	$(BIN)/python bench/bench_beam.py
	$(BIN)/python bench/bench_moe.py
	$(BIN)/python bench/bench_moe_decode.py
	$(BIN)/python bench/bench_ternary_decode.py
	$(BIN)/python bench/bench_rollout.py
	$(BIN)/python bench/bench_structured.py
	$(BIN)/python bench/bench_search_batching.py
	$(BIN)/python bench/bench_speculative.py --make-draft build/drafts --size 1m  # resumes, skips what is done
	$(BIN)/python bench/bench_speculative.py --make-draft build/drafts --size 0.4m
	$(BIN)/python bench/bench_speculative.py --draft build/drafts
	$(BIN)/python bench/readme_tables.py --machine this --write  # each table once, this machine's: docs/bench_amd.md
	$(BIN)/python bench/readme_tables.py --check  # every speed table of the README, from bench/results

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
