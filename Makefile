# Two commands do all setup on a fresh machine:  `make train`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENV ?= smax:3m
PRESET ?= fast
STEPS ?= 50000
SEED ?= 0
CONFIG ?=

.PHONY: setup train test bench clean

$(BIN)/mabl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,test]'
	touch $(BIN)/mabl

setup: $(BIN)/mabl

train: setup
	$(BIN)/mabl train --env $(ENV) --preset $(PRESET) --steps $(STEPS) --seed $(SEED) $(if $(CONFIG),--config $(CONFIG))

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/learner_speed.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
