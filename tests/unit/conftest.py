"""Fixtures shared by the kernel-free tests."""

from __future__ import annotations

import pytest

from closewait_trace.kernel import features
from closewait_trace import startup


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The privilege check fails: whatever error a CLI test sees first was found before it,
    and so before any BPF program is compiled."""
    def unprivileged(**_kw: object) -> tuple[bool, str]:
        return False, "not root"

    monkeypatch.setattr(features, "is_privileged", unprivileged)
    monkeypatch.setattr(startup, "is_privileged", unprivileged)
