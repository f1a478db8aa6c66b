# Two commands for a newcomer: `make run DATA=path/to/defungi` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(DEFUNGI_DATA)
PROFILE ?= quick
OUT ?= runs/main

.PHONY: venv run test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision first, pinned to the release on local disk where there is one (README "Set-up").
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/defungi run --profile $(PROFILE) --out $(OUT) $(if $(DATA),--data $(DATA),)

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/train_throughput.py $(if $(DATA),--data $(DATA),)

clean:
	rm -rf $(VENV) runs
