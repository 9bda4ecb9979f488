"""What the live package's tracer (conftest.py) and its tests agree on."""

from __future__ import annotations

#: the package tracer's --threshold, in seconds
THRESHOLD = 1.0

#: accepts the kernel did not report on a PREEMPT_RT kernel: the teardown checks they are counted
UNSEEN_ON_RT: list[str] = []
