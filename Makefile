# shardtrain: `make demo` trains the default recipe on the committed data; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-slow test-slurm test-gpu test-all lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf runs/demo
	launch/train.sh fashion-mnist-resnet9 shards/fashion-mnist-12k --out runs/demo

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -rP -m slow  # -rP: print the figures the real-data tests measured

test-slurm: install
	status=0; bash slurm/cluster/start.sh && \
	  $(PY) -m pytest -q -rP -m slurm || status=$$?; \
	  bash slurm/cluster/stop.sh; exit $$status

test-gpu: install  # GPU checks + table (bench/gpu_check.py); without a GPU: one line, exit 0
	$(PY) bench/gpu_check.py

test-all: test test-slow test-slurm

lint: install
	$(PY) -m pip install -q ruff==0.17.6 && $(VENV)/bin/ruff check src tests bench launch

clean:
	rm -rf runs wandb .pytest_cache
