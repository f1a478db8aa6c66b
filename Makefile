# Two commands for a newcomer: `make run DATA=path/to/defungi` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(DEFUNGI_DATA)
PROFILE ?= quick
OUT ?= runs/main

.PHONY: venv system-deps run test test-slow lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first, pinned to the release on local disk where there is one (docs/development.md "Set-up").
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Debian's chromium + chromedriver (the browser test) and postgresql (the shared-search tests), where
# they are missing and this user can install them; otherwise those tests skip, saying why.
SYSTEM_PACKAGES := chromium chromium-driver postgresql
system-deps:
	@if ! command -v chromedriver >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SYSTEM_PACKAGES) (Debian packages) for the tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "note: $(SYSTEM_PACKAGES) not installed (needs root and apt-get); their tests will skip"; fi; \
	fi

run: venv
	$(BIN)/defungi run --profile $(PROFILE) --out $(OUT) $(if $(DATA),--data $(DATA),)

# tests on tiny generated images; the slow ones (whole studies, killed workers) with test-slow
test: venv system-deps
	$(BIN)/python -m pytest -m "not slow"

test-slow: venv system-deps
	$(BIN)/python -m pytest -m slow

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/train_throughput.py $(if $(DATA),--data $(DATA),)

clean:
	rm -rf $(VENV) runs
