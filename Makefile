# The two commands of the README: `make demo` and `make test`. Each does all set-up first.
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup setup-dev setup-vm demo test test-unit test-kernel test-vm lint typecheck bench clean

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

setup-vm:
	scripts/setup.sh --dev --vm

demo: setup
	$(SUDO) $(VENV)/bin/closewait-trace demo

# Everything CI runs: kernel-free tests, kernel tests on this machine's kernel (failing, not
# skipping, when they cannot run), type checks.
test: setup-dev
	$(SUDO) env CLOSEWAIT_REQUIRE_KERNEL=1 $(PY) -m pytest -q tests
	$(PY) -m mypy

test-unit: setup-dev
	$(PY) -m pytest -q tests/unit

test-kernel: setup-dev
	$(SUDO) env CLOSEWAIT_REQUIRE_KERNEL=1 $(PY) -m pytest -q tests/kernel

typecheck: setup-dev
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache
