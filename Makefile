# Two entry points (README): `make demo` (set up + run the toy pipeline) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ROOT ?= runs

.PHONY: setup demo test test-fast clean
setup: $(VENV)/.installed

# constraints.txt pins torch 2.14.1 / torchvision 0.29.1 and everything else, so installs are reproducible.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -c constraints.txt -e '.[flows,dev,s3]'
	touch $@

demo: setup
	$(VENV)/bin/reflow run --preset toy2d --root $(ROOT)

test: setup
	$(PY) -m pytest -q --timeout=900

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(ROOT)
