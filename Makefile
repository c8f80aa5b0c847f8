# Qwen All-in-One (GGUF). `make help` lists the targets.
PY       ?= python3
VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
# The defaults are written once (the pipeline's in convert/defaults.py, the app's in allinone_gguf/faces/defaults.py,
# both standard library only, so the system Python reads them before the virtual env exists) and printed by
# faces.defaults: source checkout, models folder, quant type, host, port.
APP_DEFAULTS := $(shell $(PY) -m allinone_gguf.faces.defaults)
ifneq ($(words $(APP_DEFAULTS)),5)
$(error cannot read the defaults with `$(PY) -m allinone_gguf.faces.defaults` (Python >= 3.10 needed; PY=...))
endif
SRC      ?= $(word 1,$(APP_DEFAULTS))
MODELS   ?= $(word 2,$(APP_DEFAULTS))
HOST     ?= $(word 4,$(APP_DEFAULTS))
PORT     ?= $(word 5,$(APP_DEFAULTS))
NAME     := $(notdir $(patsubst %/,%,$(SRC)))
# The file `python -m convert all SRC --out MODELS` writes for quant type $(1) (convert.defaults.model_file).
model_file = $(MODELS)/$(NAME)/$(NAME)-$(1).gguf
RUN_MODEL ?= $(call model_file,$(word 3,$(APP_DEFAULTS)))
# Optional environment with torch + transformers, used only by the reference-converter test.
REF_VENV ?= .venv-ref
# Optional environment with torch + peft for `make tune` (the sentiment LoRA); the product never imports torch.
TUNE_VENV ?= .venv-tune
# make tune: the training files (never the full public corpora). It reports accuracy on the texts it held back from
# each; the Chinese dev files (the adapter answers 正面/负面) are scored by make bench-adapter, or by make tune with
# SCORE_DEV=1 (1,000 texts more to read: minutes). TUNE_ARGS passes more flags (python -m allinone_gguf tune --help).
TUNE_DATA ?= $(wildcard ../shared/data/sentiment/train/*.train2000.csv)
ZH_DEV    := $(filter-out %sst2_glue_dev.dev200.csv,$(wildcard ../shared/data/sentiment/*.dev200.csv))
TUNE_DEV  ?= $(if $(filter 1 yes,$(SCORE_DEV)),$(ZH_DEV))
TUNE_ARGS ?=
LLAMA_CPP_VERSION := 0.3.36
# llama-cpp-python builds llama.cpp from source for this CPU (-march=native). On x86-64 we leave out ggml's
# AMX kernels: on the Xeon VMs we develop on they crash with a segfault at the first quantized matmul, and
# without them the AVX-512/AVX2 kernels serve. The wheel is built once into WHEELHOUSE and reused.
ifeq ($(shell uname -m),x86_64)
NO_AMX   := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif
WHEELHOUSE ?= $(HOME)/.cache/allinone-gguf/wheels-noamx
# make llama-server: llama.cpp's own llama-server and llama-batched-bench, built from the llama.cpp that the
# llama-cpp-python sdist vendors (the same sources as the wheel: Release, CPU only, -march=native without AMX,
# static, no curl/OpenSSL, no web UI so nothing is fetched at build time), as a reference to measure the app
# against (docs/llama-server.md). The sdist is the one the golden tests use (convert/reference_files.py).
LLAMA_CPP_HOME ?= $(HOME)/.cache/allinone-gguf/llama.cpp-$(LLAMA_CPP_VERSION)
LLAMA_SDIST_DIR ?= .cache/vocab/llama-cpp-python-$(LLAMA_CPP_VERSION)
LLAMA_TOOLS := llama-server llama-batched-bench
LLAMA_BUILD_JOBS ?= 2
LLAMA_TOOLS_CMAKE_ARGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_COMMIT=llama-cpp-python-$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)
# make bench: the default model's Q4_K_M and Q8_0 (and F16 when present), or MODEL="a.gguf b.gguf".
# DATA="a.csv b.csv" picks the accuracy sets (default: ../shared/data/sentiment/*.csv); BENCH_ARGS passes more flags.
DEFAULT_BENCH := $(call model_file,Q4_K_M) $(call model_file,Q8_0)
MODEL    ?= $(DEFAULT_BENCH) $(wildcard $(call model_file,F16))
DATA     ?=
BENCH_ARGS ?=
# The seeds' transformers baseline runs on this Hugging Face checkout (hub id or folder).
BASELINE ?= $(SRC)
BENCH_CMD = $(PYTHON) -m allinone_gguf bench $(foreach m,$(MODEL),--model $(m)) $(foreach d,$(DATA),--data $(d)) $(BENCH_ARGS)
# make test: what the suite needs besides the virtual env. Debian packages for the browser tests (installed
# when we are root, else named); the real 0.5B stand-in for the slow tests, made by PROXY_TOOL when it is
# there (then a missing stand-in fails the slow tests instead of skipping them). PYTEST_ARGS passes more flags.
SYSTEM_PACKAGES := chromium fonts-noto-cjk
PROXY_TOOL ?= ../shared/tools/proxy-model.sh
PYTEST_ARGS ?=

.PHONY: help setup models run test system-packages bench bench-baseline bench-ray bench-api bench-messages bench-adapter bench-cache clean reference-env ray-env tune tune-env tune-grid

help:
	@echo "make setup                 virtual env in $(VENV) with the pinned dependencies (builds llama-cpp-python, ~6 min the first time)"
	@echo "make models [SRC=...]      download SRC (hub id or local folder), convert to F16 GGUF, quantize to Q8_0 and Q4_K_M under $(MODELS)/<name>/"
	@echo "make run [SRC=...]         the app on http://$(HOST):$(PORT) with $(RUN_MODEL) (runs make models first when it is missing)"
	@echo "make test                  the whole test suite, after installing what it needs (system packages when root, $(REF_VENV), the stand-in model)"
	@echo "make bench [MODEL=...]     speed, memory and accuracy of the Q4_K_M and Q8_0 files (or MODEL=\"a.gguf b.gguf\"), then serving figures (1-8 concurrent streams vs bare llama_decode) of the first -> bench/results/"
	@echo "make bench-baseline        the same plus the seeds' transformers FP32 approach on BASELINE=$(BASELINE) (needs make reference-env)"
	@echo "make tune                  fine-tune the sentiment LoRA for MODEL (default: the Q4_K_M) on DATA (default: the train/ files); SCORE_DEV=1 also scores the Chinese dev files"
	@echo "make tune-grid             the adapter's learning curve: tune once per setting (texts, targets, epochs, length) -> bench/results/tune-grid-* (~20 min a row on 2 cores)"
	@echo "make bench-adapter         the sentiment adapter vs the grammar path on the dev files (accuracy, ECE, flips, latency, RSS)"
	@echo "make tune-env              optional: $(TUNE_VENV) with torch + peft for make tune (built on first use)"
	@echo "make reference-env         optional: $(REF_VENV) with torch + transformers for the reference-converter test"
	@echo "make ray-env               optional: Ray (the ray extra) in $(VENV), for classify --engine ray and tests/test_ray.py"
	@echo "make bench-ray [MODEL=x]   texts/s of classify, local vs Ray (1 actor x 2 threads, 2 x 1) on 2,000 texts"
	@echo "make bench-api [MODEL=x]   the app as a server: 413/400 bounds, a chat's first token during a 2,000-text classify, json_schema replies"
	@echo "make bench-messages [MODEL=x] each message's label + reply over HTTP for 1, 4, 8 users, beside llama-server's bare reply"
	@echo "make bench-cache [MODEL=x] the sentiment cache off and on: texts/s on a stream with 30% repeated texts, a repeat's answer time"
	@echo "make llama-server          llama.cpp's own llama-server and llama-batched-bench from the vendored sources, CPU, no AMX -> $(LLAMA_CPP_HOME)/bin/ (~10 min once)"
	@echo "make clean                 remove built models and caches (keeps the virtual env)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	@ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source (about 6 minutes on 2 cores, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PYTHON) -m pip wheel -q --no-cache-dir --no-deps -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(PYTHON) -m pip install -q --find-links $(WHEELHOUSE) -e '.[test]'
	touch $@

models: setup
	$(PYTHON) -m convert all $(SRC) --out $(MODELS)

run: setup
	@test -f $(RUN_MODEL) || $(MAKE) models
	$(PYTHON) app.py --model $(RUN_MODEL) --models-dir $(MODELS) --host $(HOST) --port $(PORT)

test: setup reference-env tune-env ray-env system-packages
	@set -e; \
	if [ -z "$$ALLINONE_PROXY_MODEL" ] && [ -f $(PROXY_TOOL) ]; then \
	  echo "== the real 0.5B stand-in for the slow tests ($(PROXY_TOOL))"; \
	  out=$$(bash $(PROXY_TOOL)) || { echo "error: $(PROXY_TOOL) failed" >&2; exit 1; }; \
	  ALLINONE_PROXY_MODEL=$$(printf '%s\n' "$$out" | tail -n 1); export ALLINONE_PROXY_MODEL; \
	fi; \
	if [ -n "$$ALLINONE_PROXY_MODEL" ]; then export ALLINONE_REQUIRE_PROXY=1; fi; \
	echo "== $(PYTHON) -m pytest $(PYTEST_ARGS)"; \
	$(PYTHON) -m pytest $(PYTEST_ARGS)

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== Debian packages for the browser tests: $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "note: the browser tests need the Debian packages:$$(echo ' '$$missing); they will fail until" \
	       "you run: sudo apt-get install $$(echo $$missing)" >&2; \
	fi

bench: setup
ifeq ($(origin MODEL),file)
	@for f in $(DEFAULT_BENCH); do test -f $$f || { $(MAKE) models || exit 1; break; }; done
endif
	$(BENCH_CMD)
	$(PYTHON) -m allinone_gguf.measure.bench_serving $(firstword $(MODEL))

bench-baseline: setup
	@test -x $(REF_VENV)/bin/python || echo "note: $(REF_VENV) is missing, so the baseline will be skipped; make reference-env builds it"
	$(BENCH_CMD) --baseline $(BASELINE) --baseline-python $(REF_VENV)/bin/python

# The ray extra (pyproject.toml) in the project's env: classify --engine ray and tests/test_ray.py need it.
ray-env: $(VENV)/.ray-installed

$(VENV)/.ray-installed: $(VENV)/.installed pyproject.toml
	$(PYTHON) -m pip install -q --find-links $(WHEELHOUSE) -e '.[test,ray]'
	touch $@

# MODEL defaults to the real 0.5B stand-in (a coder model) made by PROXY_TOOL.
bench-ray: ray-env
	@model="$(if $(filter command line environment,$(origin MODEL)),$(MODEL),$$(bash $(PROXY_TOOL) | tail -n 1))"; \
	$(PYTHON) -m allinone_gguf.measure.bench_ray --model "$$model"

# The app as a network server (bounds, a chat's first token during a 2,000-text classify, json_schema replies);
# MODEL defaults to the real 0.5B stand-in (a coder model) made by PROXY_TOOL.
bench-api: setup
	@model="$(if $(filter command line environment,$(origin MODEL)),$(MODEL),$$(bash $(PROXY_TOOL) | tail -n 1))"; \
	$(PYTHON) -m allinone_gguf.measure.bench_api "$$model"

# Each message's label + reply through the HTTP API for 1, 4 and 8 users, beside llama-server's bare reply when
# `make llama-server` built it; MODEL defaults to the real 0.5B stand-in (a coder model).
bench-messages: setup
	@model="$(if $(filter command line environment,$(origin MODEL)),$(MODEL),$$(bash $(PROXY_TOOL) | tail -n 1))"; \
	$(PYTHON) -m allinone_gguf.measure.bench_messages "$$model"

# The sentiment cache off and on, on a stream of the dev files' texts with 30 % repeats (file and message by
# message), and a repeated text's answer time; MODEL defaults to the real 0.5B stand-in (a coder model).
bench-cache: setup
	@model="$(if $(filter command line environment,$(origin MODEL)),$(MODEL),$$(bash $(PROXY_TOOL) | tail -n 1))"; \
	$(PYTHON) -m allinone_gguf.measure.bench_cache "$$model"

reference-env: $(REF_VENV)/.installed

$(REF_VENV)/.installed: tests/reference-requirements.txt
	$(PY) -m venv $(REF_VENV)
	$(REF_VENV)/bin/pip install -q --upgrade pip
	$(REF_VENV)/bin/pip install -q -r tests/reference-requirements.txt
	touch $@

TUNE_MODEL = $(if $(filter command line environment,$(origin MODEL)),$(MODEL),$(RUN_MODEL))
tune-env: $(TUNE_VENV)/.installed

$(TUNE_VENV)/.installed: allinone_gguf/tune/requirements.txt
	$(PY) -m venv $(TUNE_VENV)
	$(TUNE_VENV)/bin/pip install -q --upgrade pip
	$(TUNE_VENV)/bin/pip install -q -r allinone_gguf/tune/requirements.txt
	touch $@

# MODEL and DATA as given on the command line, else the app's model and the train/ files.
tune: setup tune-env
	@test -f "$(TUNE_MODEL)" || $(MAKE) models
	$(PYTHON) -m allinone_gguf tune "$(TUNE_MODEL)" --data $(or $(DATA),$(TUNE_DATA)) --dev $(TUNE_DEV) $(TUNE_ARGS)

# One tune per setting of the grid, each into its own folder under ~/.cache (the shipped adapter is left alone);
# reported on every dev file, English included. GRID_ARGS: e.g. --set texts=300,rank=32 --threads 1.
GRID_ARGS ?=
tune-grid: setup tune-env
	@test -f "$(TUNE_MODEL)" || $(MAKE) models
	$(PYTHON) -m allinone_gguf.measure.tune_grid "$(TUNE_MODEL)" --data $(or $(DATA),$(TUNE_DATA)) \
	  --dev $(wildcard ../shared/data/sentiment/*.dev200.csv) $(GRID_ARGS)

# The adapter beside MODEL (default: the app's model) against the grammar path, on the Chinese dev files.
bench-adapter: setup
	$(PYTHON) -m allinone_gguf.measure.bench_adapter "$(TUNE_MODEL)" --data $(or $(DATA),$(ZH_DEV))

# llama.cpp's own binaries, built once into LLAMA_CPP_HOME (outside the repo; the stamp makes a rerun instant).
.PHONY: llama-server
llama-server: $(LLAMA_CPP_HOME)/bin/.built
	@for t in $(LLAMA_TOOLS); do echo "$(LLAMA_CPP_HOME)/bin/$$t"; done

$(LLAMA_CPP_HOME)/bin/.built:
	@set -e; \
	need=; command -v cmake >/dev/null || need="cmake"; \
	command -v c++ >/dev/null || command -v g++ >/dev/null || need="$$need g++"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== Debian packages to build llama.cpp:$$(echo ' '$$need)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	  else \
	    echo "error: make llama-server needs$$(echo ' '$$need) (a C++ compiler and cmake >= 3.14);" \
	         "install them with: sudo apt-get install$$(echo ' '$$need)" >&2; exit 1; \
	  fi; \
	fi; \
	sdist=$$(ls $(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz 2>/dev/null || true); \
	if [ -z "$$sdist" ]; then \
	  echo "== llama-cpp-python $(LLAMA_CPP_VERSION) source package -> $(LLAMA_SDIST_DIR)"; \
	  $(if $(wildcard $(PYTHON)),$(PYTHON),$(PY)) -m pip download -q --no-deps --no-binary :all: \
	    -d $(LLAMA_SDIST_DIR) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	  sdist=$(LLAMA_SDIST_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz; \
	fi; \
	echo "== vendor/llama.cpp of $$sdist -> $(LLAMA_CPP_HOME)/src"; \
	rm -rf $(LLAMA_CPP_HOME)/src; mkdir -p $(LLAMA_CPP_HOME)/src; \
	tar -xzf $$sdist -C $(LLAMA_CPP_HOME)/src --strip-components=3 \
	  llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp; \
	echo "== cmake: building $(LLAMA_TOOLS) (about 10 minutes on 2 cores, once)"; \
	start=$$(date +%s); \
	cmake -S $(LLAMA_CPP_HOME)/src -B $(LLAMA_CPP_HOME)/build $(LLAMA_TOOLS_CMAKE_ARGS) >$(LLAMA_CPP_HOME)/cmake.log 2>&1 || \
	  { tail -n 30 $(LLAMA_CPP_HOME)/cmake.log >&2; echo "error: cmake configure failed, see $(LLAMA_CPP_HOME)/cmake.log" >&2; exit 1; }; \
	cmake --build $(LLAMA_CPP_HOME)/build --config Release --target $(LLAMA_TOOLS) -j $(LLAMA_BUILD_JOBS); \
	mkdir -p $(LLAMA_CPP_HOME)/bin; \
	for t in $(LLAMA_TOOLS); do install -m 755 $(LLAMA_CPP_HOME)/build/bin/$$t $(LLAMA_CPP_HOME)/bin/$$t; done; \
	echo "== built in $$(( $$(date +%s) - start )) s: $$($(LLAMA_CPP_HOME)/bin/llama-server --version 2>&1 | head -n 1)"; \
	touch $@

clean:
	rm -rf $(MODELS) .cache build *.egg-info
