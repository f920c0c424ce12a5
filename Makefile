VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= jobs/configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: install install-gpu test test-unit demo demo-fast bench ablation rehearse clean

$(VENV)/.installed-cpu: pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh cpu

install: $(VENV)/.installed-cpu

$(VENV)/.installed-bench: $(VENV)/.installed-cpu
	$(VENV)/bin/uv pip install --python $(PY) --excludes scripts/excludes.txt -e ".[cpu,dev,bench]"
	touch $@

install-gpu:
	VENV=$(VENV) scripts/install.sh gpu

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -q -ra tests/unit $(PYTEST_ARGS)

demo: install
	$(PY) jobs/demo.py --config $(CONFIG) $(ARGS)

demo-fast: install
	$(PY) jobs/demo.py --config $(CONFIG) --fast $(ARGS)

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/run_all.py $(ARGS)

ablation: install
	$(PY) jobs/ablation.py --config $(CONFIG) $(ARGS)

# The GPU recipe end to end on an object store (moto) and a three-node local Ray cluster.
rehearse: install
	$(PY) tests/rehearsal.py $(ARGS)

clean:
	rm -rf .r2d demo-report
