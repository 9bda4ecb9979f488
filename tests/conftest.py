"""Test tiers: kernel-free tests run anywhere; tests marked `kernel` need root and a kernel
that can trace. They skip where they cannot run, unless CLOSEWAIT_REQUIRE_KERNEL=1 (set by
`make test`, CI and the VM matrix), which turns every such skip into a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_KERNEL = os.environ.get("CLOSEWAIT_REQUIRE_KERNEL") == "1"
#: Set by the VM matrix's runner: "1" in the one cell of each kernel that runs the tests
#: marked `per_kernel` (they depend on the kernel, not on the backend), "0" in the others.
PER_KERNEL_CELL = os.environ.get("CLOSEWAIT_VM_PER_KERNEL", "1") == "1"


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not Path("/sys/kernel/btf").exists() and not Path("/proc/kallsyms").exists():
        return "no kernel tracing interfaces"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not PER_KERNEL_CELL:
        _deselect_per_kernel(config, items)
    why = _kernel_unavailable()
    if why is None:
        return
    for item in items:
        if "kernel" in item.keywords:
            if REQUIRE_KERNEL:
                item.add_marker(pytest.mark.usefixtures("_kernel_required_but_missing"))
            else:
                item.add_marker(pytest.mark.skip(reason=why))


def _deselect_per_kernel(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (never skip) the per_kernel tests: another cell of this kernel runs them."""
    elsewhere = [item for item in items if "per_kernel" in item.keywords]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if "per_kernel" not in item.keywords]


@pytest.fixture
def _kernel_required_but_missing() -> None:
    pytest.fail(f"CLOSEWAIT_REQUIRE_KERNEL=1 but {_kernel_unavailable()}")


def kernel_skip(reason: str) -> None:
    """Skip a kernel test, or fail it when kernel tests are required."""
    if REQUIRE_KERNEL:
        pytest.fail(f"CLOSEWAIT_REQUIRE_KERNEL=1 but {reason}")
    pytest.skip(reason)
