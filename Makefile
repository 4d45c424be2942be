# The two commands of the README. Each creates .venv when missing and installs what it needs.
# `make test` lints with ruff ([tool.ruff] in pyproject.toml) before running the suite.
# `make test-tpu` runs the ahead-of-time TPU compile tests in .venv-tpu: .venv's packages plus
# libtpu (~700 MB, kept out of the test install; version from the `tpu` extra).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.stamp-base
STAMP_TEST := $(VENV)/.stamp-test
VENV_TPU := .venv-tpu
STAMP_TPU := $(VENV_TPU)/.stamp-tpu
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: quickstart test test-tpu install clean

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
	$(VPY) -m ruff check .
	$(VPY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

# A venv layered on .venv (same jax/flax pins, via a .pth) that adds only libtpu.
$(STAMP_TPU): pyproject.toml $(STAMP_TEST)
	$(PY) -m venv $(VENV_TPU)
	$(VENV_TPU)/bin/python -m pip install -q "$$($(VPY) -c 'import tomllib; print(next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tpu"] if d.startswith("libtpu")))')"
	echo "import site; site.addsitedir('$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
	  > "$$($(VENV_TPU)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_feallm_base_venv.pth"
	touch $@

test-tpu: $(STAMP_TPU)
	JAX_PLATFORMS=cpu $(VENV_TPU)/bin/python -m pytest -q tests/test_aot.py

clean:
	rm -rf $(VENV) $(VENV_TPU) runs
