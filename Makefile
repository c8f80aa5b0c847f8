# Qwen All-in-One (GGUF). `make help` lists the targets.
PY       ?= python3
VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
SRC      ?= Qwen/Qwen1.5-0.5B-Chat
MODELS   ?= models
NAME     := $(notdir $(patsubst %/,%,$(SRC)))
# Optional environment with torch + transformers, used only by the reference-converter test.
REF_VENV ?= .venv-ref

.PHONY: help setup models test clean reference-env

help:
	@echo "make setup                 virtual env in $(VENV) with the pinned dependencies (builds llama-cpp-python, ~6 min the first time)"
	@echo "make models [SRC=...]      download SRC (hub id or local folder), convert to F16 GGUF, quantize to Q8_0 and Q4_K_M under $(MODELS)/<name>/"
	@echo "make test                  run the test suite"
	@echo "make reference-env         optional: $(REF_VENV) with torch + transformers for the reference-converter test"
	@echo "make clean                 remove built models and caches (keeps the virtual env)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip install -e '.[test]'
	touch $@

models: setup
	$(PYTHON) -m convert all $(SRC) --out $(MODELS)

test: setup
	$(PYTHON) -m pytest

reference-env: $(REF_VENV)/.installed

$(REF_VENV)/.installed: tests/reference-requirements.txt
	$(PY) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q --upgrade pip
	$(REF_VENV)/bin/pip install -q -r tests/reference-requirements.txt
	touch $@

clean:
	rm -rf $(MODELS) .cache build *.egg-info
