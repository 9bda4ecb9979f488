"""The guests' Python trees in guest RAM.

A guest's root is the host's, over 9p without a cache: every stat, open and read of a Python
module goes to the host. In a 5.10 guest each costs about 5 ms (1 ms in 6.1's), and a tracer
start makes about 4,600 such calls, a third of them in the standard library and the virtual
environment; `import closewait_trace.cli` took 17 s there and 7 s in a 6.1 guest. So the
runner packs those two trees into one tar on the host (one file: read in large 9p reads), and
the guest script unpacks it into its RAM and lays it over the 9p directories, read-only
(overlayfs: the RAM copy first, the 9p directory below it for whatever the tar leaves out).
Measured in a 5.10 guest: the import 17 s -> 6.4-7.5 s, a tracer start (`--duration 1s`, exec
to exit) 77 s -> 56 s, for 17 s of unpacking once per guest.

Left out (still read over 9p, below the RAM copy): the standard library's tests and GUI
modules, and the virtual environment's packages that no guest test imports (type checker,
pip, the Kubernetes schemas).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path

#: what no guest test imports (tar --exclude patterns, matched against the member names)
EXCLUDE = [
    "usr/lib/python3*/test", "usr/lib/python3*/idlelib", "usr/lib/python3*/tkinter",
    "usr/lib/python3*/lib2to3", "usr/lib/python3*/ensurepip", "usr/lib/python3*/turtledemo",
    "*/site-packages/kubernetes_validate*", "*/site-packages/mypy*", "*/site-packages/*mypyc*",
    "*/site-packages/pip", "*/site-packages/setuptools", "*/site-packages/hypothesis",
    "*/site-packages/ast_serialize", "*/site-packages/pygments",
]

#: where the guest unpacks the tar (a tmpfs), and binds the 9p directories it covers
GUEST_HOT = "/run/closewait-hot"
GUEST_LOWER = "/run/closewait-lower"


def python_trees(repo: Path) -> list[Path]:
    """The standard library and the site-packages of the repository's venv (the guests' tests
    run `.venv/bin/python`, whoever runs the runner), those that exist."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    venv = repo / ".venv" / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    return [t.resolve() for t in dict.fromkeys((stdlib, venv)) if t.is_dir()]


def build(directory: Path, trees: list[Path], exclude: list[str] = EXCLUDE) -> Path:
    """A new tar of `trees` (names without the leading /) in `directory`, one per run: a run
    beside it has its own. The caller removes it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="python-", suffix=".tar", dir=directory)
    os.close(fd)
    argv = ["tar", "-cf", name, "-C", "/", "--warning=no-file-changed",
            *(f"--exclude={p}" for p in exclude), *(str(t.relative_to("/")) for t in trees)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode > 1:  # 1: a file changed while read (a .pyc written meanwhile): kept as read
        Path(name).unlink(missing_ok=True)
        raise subprocess.CalledProcessError(r.returncode, argv, r.stdout, r.stderr)
    return Path(name)


def guest_lines(tar: Path, trees: list[Path]) -> list[str]:
    """Shell lines for the guest script: unpack `tar` and lay each tree's RAM copy over it.
    A step that fails leaves that tree on 9p, and says so on the guest's console."""
    if not trees:
        return []
    t = shlex.quote(str(tar))
    lines = [f"  if [ -f {t} ] && mkdir -p {GUEST_HOT} && tar -xf {t} -C {GUEST_HOT}; then"]
    for tree in trees:
        d = shlex.quote(str(tree))
        hot, lower = shlex.quote(f"{GUEST_HOT}{tree}"), shlex.quote(f"{GUEST_LOWER}{tree}")
        said = shlex.quote(f"runner: {tree} stays on 9p")
        lines.append(f"    mkdir -p {lower} && mount --bind {d} {lower} && mount -t overlay"
                     f" closewait-hot -o ro,lowerdir={hot}:{lower} {d} || echo {said} >&2")
    said = shlex.quote(f"runner: no hot layer ({tar})")
    lines.append(f"  else rm -rf {GUEST_HOT}; echo {said} >&2; fi")
    return lines
