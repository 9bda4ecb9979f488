"""Where closewait-trace's memory goes at start-up: the process's resident memory after each
stage (Python alone, the imports with BCC's library, the tracer's start: compile, load,
attach, configure, and what the compile left given back: kernel/release.py), split into
anonymous memory (the process's own heap) and file-backed pages (the mapped libraries: BCC's
with its compiler, Python's, libc; the kernel can reclaim them).

`sudo .venv/bin/python -m bench.memory`: one line per stage, then a JSON line with the same
numbers (kB). It loads the tracer's real programs with the default options in this process
and detaches them at exit; nothing is traced and there is no target. Exit codes: 0, or the
tracer's own for an error (77 without the privileges to load BPF programs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from bench.load import status_kb

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def memory() -> dict[str, int]:
    """This process's resident memory, kB, by FIELDS."""
    return {key: status_kb(os.getpid(), key) or 0 for key in FIELDS}


def stages() -> dict[str, dict[str, int]]:
    """The memory after each stage of a start."""
    out = {"python": memory()}
    from closewait_trace import cli  # noqa: F401  (what the command imports)
    from closewait_trace.kernel.attach import import_bcc
    from closewait_trace.options import Options
    from closewait_trace.startup import open_live_world
    import_bcc()
    out["imports"] = memory()
    world, _info = open_live_world(Options(), lambda _text: None)
    out["loaded"] = memory()
    world.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args(argv)
    from closewait_trace.errors import CloseWaitError
    try:
        found = stages()
    except CloseWaitError as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return exc.exit_code
    for name, mem in found.items():
        print(f"{name:8} " + "  ".join(f"{k} {mem[k] / 1024:6.1f} MB" for k in FIELDS))
    print(json.dumps({"type": "memory", "kB": found}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
