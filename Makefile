# The two commands of the README: `make demo` and `make test`. Each does all set-up first.
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# The kernel x backend matrix under QEMU, every backend forced, in `make test` (CI): Debian
# 12's 6.1 and 6.12, Debian 11's 5.10 and Debian 12's 6.1 PREEMPT_RT (the last two unpacked by
# scripts/vm-kernels.sh, not installed). A kernel may name its own backends after a colon (+).
VM_KERNELS ?= 5.10,6.1-rt:kprobe+tracepoint,6.1,6.12
VM_BACKENDS ?= kprobe,fentry,tracepoint
VM_LOGS ?= logs/vm
#: Fallbacks forced in one cell each: the perf-buffer event path (kernels before 5.8) in 6.1's
#: fentry cell, the classic state tracepoint (kernels without BTF) in 6.12's fentry cell.
VM_CELL_ENV ?= --cell-env 6.1-fentry:CLOSEWAIT_FORCE_PERF_BUFFER=1 \
  --cell-env 6.12-fentry:CLOSEWAIT_CLASSIC_TRACEPOINT=1
VM_CMD = CLOSEWAIT_BACKEND={backend} CLOSEWAIT_REQUIRE_KERNEL=1 CLOSEWAIT_START_TIMEOUT=600 \
  .venv/bin/python -m pytest tests/kernel -q -p no:cacheprovider -m 'not host_only' \
  --durations=15 --junitxml={junit}

.PHONY: setup setup-dev setup-vm demo test test-host test-bcc-trixie test-unit test-kernel test-vm \
  typecheck bench scale soak clean

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh --dev

setup-vm:
	scripts/setup.sh --dev --vm --vm-extra

demo: setup
	$(SUDO) $(VENV)/bin/closewait-trace demo

# Everything CI runs: kernel-free tests, kernel tests on this machine's kernel (failing, not
# skipping, when they cannot run), type checks, then the VM matrix.
test: setup-vm
	$(MAKE) --no-print-directory test-host
	$(MAKE) --no-print-directory test-bcc-trixie
	$(MAKE) --no-print-directory test-vm

test-host: setup-dev
	$(SUDO) env CLOSEWAIT_REQUIRE_KERNEL=1 $(PY) -m pytest -q --durations=25 tests
	$(PY) -m mypy

test-unit: setup-dev
	$(PY) -m pytest -q tests/unit

test-kernel: setup-dev
	$(SUDO) env CLOSEWAIT_REQUIRE_KERNEL=1 $(PY) -m pytest -q tests/kernel

# Debian 13's BCC (0.31) and Python 3.13 on this machine's kernel: the guests' suite in a
# trixie root (scripts/bcc-root.sh makes it once); the first test checks the BCC it ran with.
test-bcc-trixie: setup-dev
	$(SUDO) env CLOSEWAIT_REQUIRE_KERNEL=1 CLOSEWAIT_EXPECT_BCC=0.31 scripts/bcc-root.sh \
	  --suite trixie -- python -m pytest tests/kernel -q -p no:cacheprovider -m 'not host_only' \
	  --durations=10

# The runner merges the header trees on the host first; the guests' tracers reuse them.
test-vm: setup-vm
	$(SUDO) $(PY) -m tests.vm.runner --kernels $(VM_KERNELS) --backends $(VM_BACKENDS) \
	  --jobs 2 --cpus 1 --timeout 1800 --logs $(VM_LOGS) $(VM_CELL_ENV) -- "$(VM_CMD)"

# Measurements (commands, not tests): reports go to bench/results/. See bench/README.md.
bench: setup-dev
	$(SUDO) $(PY) -m bench.overhead

scale: setup-dev
	$(SUDO) $(PY) -m bench.scale

soak: setup-dev
	$(SUDO) $(PY) -m bench.soak

typecheck: setup-dev
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache logs
