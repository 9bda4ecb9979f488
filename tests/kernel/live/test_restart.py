"""A server restarted on the same port: the next leak is the new process's, under a tracer
that saw the first server start listening (the package's). The same with a listener that was
there before the tracer started is test_lifecycle.py's."""

from __future__ import annotations

import subprocess

import pytest

from ..harness import Tracer, restart_owns_the_next_leak

pytestmark = pytest.mark.kernel


def test_server_restarted_on_the_same_port_owns_the_next_leak(
        tracer: Tracer, procs: list[subprocess.Popen[str]]) -> None:
    restart_owns_the_next_leak(tracer, procs, started=None)
