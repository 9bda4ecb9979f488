"""One live tracer for the whole package: every process, threshold 1 s, stays listed from
100 ms, the default accept watch.

A tracer start is most of a test's time in the VM matrix's guests (BCC compiles at every
start), so the tests of this package run under one tracer, the way a tracer already running on
a server meets each case; each test owns its servers' ports and reads only their records. The
fixture's scope is the package: the tracer stops after the package's last test, before the
other modules start tracers of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..harness import Tracer, stopped_cleanly
from .shared import THRESHOLD, UNSEEN_ON_RT


@pytest.fixture(scope="package")
def tracer() -> Iterator[Tracer]:
    t = Tracer(["--threshold", f"{THRESHOLD}s", "--report-min", "100ms"]).start()
    try:
        yield t
    finally:
        rc = t.stop()
    summary = stopped_cleanly(t, rc)
    assert summary["kernel_skipped"] >= len(UNSEEN_ON_RT), UNSEEN_ON_RT
    assert summary["complete"] is True
