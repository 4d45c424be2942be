# The two commands of the README. Each creates .venv when missing and installs what it needs.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.stamp-base
STAMP_TEST := $(VENV)/.stamp-test
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: quickstart test install clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(STAMP_BASE): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP_BASE)

install: $(STAMP_BASE)

quickstart: $(STAMP_BASE)
	$(VPY) -m launch.quickstart --workdir=$(WORKDIR)

test: $(STAMP_TEST)
	$(VPY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
