"""Where closewait-trace's memory goes at start-up: the process's resident memory after each
stage (Python alone, the imports with BCC's library, compile + load + attach), split into
anonymous memory (the process's own heap) and file-backed pages (libraries' code and data,
shared with every process that maps them and reclaimable by the kernel).

`sudo .venv/bin/python -m bench.memory`: one line per stage, then a JSON line with the same
numbers (kB). It loads the tracer's real programs with the default options and detaches them
at exit; nothing is traced.
"""

from __future__ import annotations

import json
import sys
from typing import Any

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def memory() -> dict[str, int]:
    """This process's resident memory, kB, from /proc/self/status."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0])
    return out


def main() -> int:
    stages: dict[str, dict[str, int]] = {"python": memory()}
    from closewait_trace.kernel.attach import import_bcc
    from closewait_trace.options import Options
    from closewait_trace.startup import open_live_world
    import closewait_trace.cli  # noqa: F401  (what the command imports)
    import_bcc()
    stages["imports"] = memory()
    world, _info = open_live_world(Options(), lambda _text: None)
    stages["loaded"] = memory()
    world.close()
    for name, mem in stages.items():
        print(f"{name:8} " + "  ".join(f"{k} {v / 1024:6.1f} MB" for k, v in mem.items()))
    report: dict[str, Any] = {"type": "memory", "kB": stages}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
