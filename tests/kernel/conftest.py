"""Fixtures of every kernel test module (and of the live package's)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from .harness import kill_groups


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started with harness.spawn_script: their groups are killed at its end,
    whether it passed or not."""
    started: list[subprocess.Popen[str]] = []
    yield started
    kill_groups(started)
    for p in started:
        if p.stdout is not None:
            p.stdout.close()
