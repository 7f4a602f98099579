# `make test` and `make serve` work on a fresh machine: they create .venv with Python 3.12 and install mixjax.
VENV := .venv
PY := $(VENV)/bin/python
# 8 simulated CPU devices, so that meshes such as 2x4 exist without GPUs.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: test serve venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $$(tools/find_python.sh) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: venv
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

serve: venv
	$(PY) -m mixjax.serve $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
