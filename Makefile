# maejax: `make demo` (set up, then pre-train on Fashion-MNIST), `make test`
# (set up, then lint and the whole suite), `make bench` (speed vs. the reference).
# `make demo` installs what the demo needs (maejax and the `data` extra, to build
# Fashion-MNIST from Debian's files); `make test` adds the `test` extra.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
FMNIST_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_WORKDIR ?= workdirs/mae_fmnist

.PHONY: setup setup-demo data test lint format demo bench clean

setup: $(TEST_STAMP) data
setup-demo: $(DEMO_STAMP) data

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(DEMO_STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e '.[data]'
	touch $(DEMO_STAMP)

$(TEST_STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

# Debian's copy of Fashion-MNIST: tests and the demo read it, never the network.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest

demo: setup-demo
	$(PY) -m maejax.main --config=configs/mae_fmnist.py --workdir=$(DEMO_WORKDIR)

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdirs
