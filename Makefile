# maejax: `make demo` (set up, then pre-train on Fashion-MNIST), `make test`
# (set up, then lint and the whole suite), `make bench` (speed vs. the reference).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_WORKDIR ?= workdirs/mae_fmnist

.PHONY: setup data test lint format demo bench clean

setup: $(STAMP) data

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian's copy of Fashion-MNIST: tests and the demo read it, never the network.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest

demo: setup
	$(PY) -m maejax.main --config=configs/mae_fmnist.py --workdir=$(DEMO_WORKDIR)

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdirs
