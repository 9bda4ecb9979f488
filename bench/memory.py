"""Where closewait-trace's memory goes at start-up: the process's resident memory after each
stage (Python alone, the imports with BCC's library, the tracer's start: compile, load,
attach, configure, and what the compile left given back: kernel/release.py), split into
anonymous memory (the process's own heap) and file-backed pages (the mapped libraries: BCC's
with its compiler, Python's, libc; the kernel can reclaim them).

Two more figures, each from a process of its own:

* without BCC: a fresh interpreter that imports every module of the package but never BCC,
  the least a long-running tracer could keep if a short-lived child compiled and loaded the
  programs and handed them over (bpffs pins) to a reader of maps and ring buffer without BCC;
* the start's peak in a memory cgroup of its own (cgroup v2 ``memory.peak``, Linux 5.19 and
  later, or v1 ``memory.max_usage_in_bytes``): what a container's or a systemd unit's memory limit sees,
  page cache the start reads for the first time included, and what a compile in a child
  would still charge to the same cgroup. It runs first; pages already cached by an earlier
  process are not charged again, so a first start on a cold node charges more.

`sudo .venv/bin/python -m bench.memory`: one line per stage, then a JSON line with the same
numbers (kB). It loads the tracer's real programs with the default options in this process
and detaches them at exit; nothing is traced and there is no target. Exit codes: 0, or the
tracer's own for an error (77 without the privileges to load BPF programs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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


#: Run in a fresh interpreter: import every module of the package, never BCC, and print the
#: memory (kB) as JSON; refuse (exit 3) if some import pulled BCC in.
_WITHOUT_BCC = """
import importlib, json, os, pkgutil, sys
import closewait_trace
from bench.load import status_kb
for mod in pkgutil.walk_packages(closewait_trace.__path__, "closewait_trace."):
    if not mod.name.endswith("__main__"):
        importlib.import_module(mod.name)
if "bcc" in sys.modules:
    sys.exit(3)
print(json.dumps({key: status_kb(os.getpid(), key) or 0 for key in sys.argv[1:]}))
"""


def without_bcc() -> dict[str, int]:
    """The memory of a fresh interpreter with every module of the package imported, no BCC."""
    r = subprocess.run([sys.executable, "-c", _WITHOUT_BCC, *FIELDS], capture_output=True,
                       text=True, timeout=120, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"the import of the package without BCC failed ({r.returncode}):"
                           f" {r.stderr.strip()[-300:]}")
    found: dict[str, int] = json.loads(r.stdout)
    return found


def memory_cgroup_root() -> tuple[Path, str] | None:
    """Where new memory cgroups go and the file of their peak: cgroup v2 when its root
    delegates the memory controller, else cgroup v1's memory hierarchy; None if neither."""
    v2 = Path("/sys/fs/cgroup")
    try:
        if "memory" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2, "memory.peak"
    except OSError:
        pass
    v1 = v2 / "memory"
    if (v1 / "memory.max_usage_in_bytes").exists():
        return v1, "memory.max_usage_in_bytes"
    return None


#: Enter the cgroup "$0", then become the command: the interpreter's start is charged too,
#: as for a container's process, which starts inside its cgroup.
_IN_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


def start_peak_kb() -> int | None:
    """The peak (kB) of a memory cgroup made for one run of the stages in a child process
    that starts inside it; None where no memory controller can be used, or the kernel keeps
    no peak (cgroup v2's memory.peak came in Linux 5.19)."""
    found = memory_cgroup_root()
    if found is None:
        return None
    root, peak_file = found
    group = root / f"closewait-bench-memory-{os.getpid()}"
    group.mkdir()
    try:
        if not (group / peak_file).exists():
            return None
        r = subprocess.run(["sh", "-c", _IN_CGROUP, str(group), sys.executable, "-m",
                            "bench.memory", "--stages-only"],
                           capture_output=True, text=True, timeout=300, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"the start in a cgroup of its own failed ({r.returncode}):"
                               f" {r.stderr.strip()[-300:]}")
        return int((group / peak_file).read_text()) // 1024
    finally:
        try:
            group.rmdir()  # the child has exited: the group is empty
        except OSError as exc:
            print(f"bench.memory: the cgroup {group} is left behind: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages-only", action="store_true",
                        help="only the stages of a start in this process (used for the cgroup peak)")
    args = parser.parse_args(argv)
    from closewait_trace.errors import CloseWaitError
    try:
        if args.stages_only:
            stages()
            return 0
        peak = start_peak_kb()  # first: the page cache the start reads is as cold as it is
        found = stages()
        alone = without_bcc()
    except CloseWaitError as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return 2
    for name, mem in [*found.items(), ("no-bcc", alone)]:
        print(f"{name:8} " + "  ".join(f"{k} {mem[k] / 1024:6.1f} MB" for k in FIELDS))
    print("start's cgroup peak: " + (f"{peak / 1024:.1f} MB" if peak is not None else
                                     "none: no cgroup v1 memory hierarchy, and cgroup v2's root"
                                     " does not delegate memory or (before Linux 5.19) keeps"
                                     " no memory.peak"))
    print(json.dumps({"type": "memory", "kB": found, "without_bcc_kB": alone,
                      "cgroup_peak_kB": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
