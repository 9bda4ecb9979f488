"""Run a command inside real Debian kernels under QEMU (virtme-ng), for a kernel x backend matrix.

Each *cell* (kernel series x backend) boots one guest with ``vng --run /boot/vmlinuz-RELEASE``
on the host's own root filesystem (read-only 9p with tmpfs overlays, so the repository, the
venvs, BCC and /usr/src are all visible), runs the command in the repository directory, and
collects its exit status and pytest junit XML through a per-cell host directory that the
guest can write (``vng --rwdir``).  The repository itself is an overlay in the guest
(``vng --overlay-rwdir``): writable there, nothing written reaches the host.  The Python
standard library and the venv's site-packages are read from a RAM copy laid over them
(hotlayer.py; ``--no-hot-layer``: over 9p).

Kernels come from /boot (installed Debian packages: 6.1, 6.12) or from the cache that
``scripts/vm-kernels.sh`` fills without installing anything (Debian 11's 5.10, Debian 12's
6.1 PREEMPT_RT, series ``6.1-rt``): CACHE/kernels/RELEASE/{boot,lib/modules,usr/src}.
virtme-ng finds the modules next to such an image and shares them with the guest; the runner
links the kernel's header directories into the guest's /usr/src (a guest-only overlay), so the
tracer in the guest finds the running kernel's own headers as on an installed system, and
merges them on the host beforehand into the tracer's header cache, which the guest reads.

Setup (once, idempotent): ``scripts/setup.sh --vm --vm-extra``.

Usage::

    python3 -m tests.vm.runner --list
    python3 -m tests.vm.runner [--kernels 5.10,6.1,6.1-rt:kprobe+tracepoint,6.12]
        [--backends kprobe,fentry,tracepoint]
        [--timeout SEC] [--logs DIR] [--jobs N] [--env K=V ...] [--dry-run] -- CMD...

CMD (everything after ``--``, joined with spaces, run by bash in the guest; quote it as one
argument when it has shell operators) may contain these placeholders, replaced per cell:

    {backend}   the cell's backend, e.g. kprobe
    {kernel}    the cell's kernel series, e.g. 6.12
    {release}   the booted kernel release, e.g. 6.12.117+deb12-amd64
    {results}   the cell's results directory (writable by the guest, kept on the host)
    {junit}     {results}/junit.xml -- the runner reads the counts from there; when CMD
                mentions {junit}, a missing junit file fails the cell
    {repo}      the repository directory
    {kheaders}  a merged Debian 6.1 header tree usable as BCC_KERNEL_SOURCE ("" if none)

The guest also gets these environment variables: CLOSEWAIT_VM=1, CLOSEWAIT_VM_KERNEL,
CLOSEWAIT_VM_RELEASE, CLOSEWAIT_VM_BACKEND, CLOSEWAIT_VM_RESULTS, CLOSEWAIT_VM_JUNIT,
CLOSEWAIT_VM_KHEADERS, CLOSEWAIT_VM_PER_KERNEL (1 in one cell per kernel, its tracepoint
cell if it has one: that cell alone runs the tests marked ``per_kernel``, which depend on the
kernel and not on the backend; such cells start first), any ``--env K=V`` (placeholders
allowed in V), and a cell's own ``--cell-env CELL:K=V`` (``6.1-fentry:CLOSEWAIT_FORCE_PERF_BUFFER=1``).  The guest's PATH
is virtme's default (/usr/local/bin, /usr/bin, /bin, ...), not the host's.

Example (the project's kernel tests, one cell per kernel and backend)::

    python3 -m tests.vm.runner --kernels 6.1,6.12 --backends kprobe,fentry,tracepoint -- \\
      'CLOSEWAIT_BACKEND={backend} CLOSEWAIT_REQUIRE_KERNEL=1 .venv/bin/python -m pytest \\
       tests/kernel -q -p no:cacheprovider --junitxml={junit}'

Selftest of the runner itself (proves boot, BCC tracepoint + kretprobe in the guest)::

    python3 -m tests.vm.runner --kernels 6.1,6.12 --backends none -- \\
      '/usr/bin/python3 -m pytest -c tests/vm/selftest/pytest.ini tests/vm/selftest -v --junitxml={junit}'

Parallel guests (measured on 2 host cores, TCG): ``--jobs 2 --cpus 1`` ran two selftest
cells in ~95 s against ~160-185 s one at a time; ``--jobs 2 --cpus 2`` (4 vCPU threads on 2
cores) was slower than sequential (~210-225 s).  A guest with 1 vCPU is not slower than with 2.

A cell fails when its guest does not boot, hangs past ``--timeout`` (it is killed), returns
no exit status, exits non-zero, or its junit XML reports failures or errors.  Logs per cell
(``--logs DIR``/KERNEL-BACKEND/): console.log (kernel console + vng), output.log (the
command's stdout+stderr), run.sh/cmd.sh (what the guest ran), vng-cmd.txt, exit-status,
junit.xml; DIR/summary.json holds the table.  A failed cell's report ends with the last
lines of its output and each failed test's name and message from its junit XML, ten at most
(pytest's durations may fill the last lines).  Exit status: 0 if every cell passed, 1 if any
failed, 2 for usage/setup errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from closewait_trace.outputs.textsafe import visible

from . import hotlayer
from . import kheaders as _kheaders

REPO = Path(__file__).resolve().parents[2]
BOOT_DIR = Path("/boot")
VM_CACHE = Path(os.environ.get("CLOSEWAIT_VM_CACHE", "/var/lib/closewait-vm"))
KERNEL_CACHE = VM_CACHE / "kernels"
#: merged header trees for the guests' tracers (the guest's own /var/cache is a tmpfs)
HEADER_CACHE = VM_CACHE / "headers"
#: where each run writes its tar of the Python trees the guests keep in RAM (hotlayer.py)
HOT_DIR = VM_CACHE / "hot"
DEFAULT_TIMEOUT = 20 * 60
DEFAULT_LOGS_ROOT = Path("/tmp/closewait-vm/logs")
DEFAULT_KERNELS = "6.1,6.12"
DEFAULT_BACKENDS = "kprobe,fentry,tracepoint"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@:-]+$")  # vng --rwdir splits on '=' and ','


# ---------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    series: str  # "6.1", "5.10", "6.1-rt" (PREEMPT_RT)
    release: str  # "6.1.0-56-amd64"
    image: Path  # /boot/vmlinuz-6.1.0-56-amd64
    #: for a kernel unpacked by scripts/vm-kernels.sh (not installed): the directory holding
    #: its boot/, lib/modules/ and usr/src/; None for an installed kernel (/boot)
    root: Path | None = None


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def series_of(release: str) -> str | None:
    """``6.1.0-57-amd64`` -> ``6.1``; ``6.1.0-57-rt-amd64`` -> ``6.1-rt``; None if not a release."""
    m = re.match(r"^(\d+)\.(\d+)[.-]", release + "-")
    if not m:
        return None
    rt = "-rt" if re.search(r"-rt\d*(-|$)", release) else ""
    return f"{m.group(1)}.{m.group(2)}{rt}"


def kernel_dirs(boot_dir: Path = BOOT_DIR, cache: Path = KERNEL_CACHE) -> list[Path]:
    """/boot, then the boot/ of every kernel unpacked under ``cache`` (scripts/vm-kernels.sh)."""
    unpacked = sorted(d / "boot" for d in cache.glob("*") if (d / ".complete").is_file())
    return [boot_dir, *unpacked]


def installed_kernels(boot_dirs: Path | list[Path] | None = None) -> list[Kernel]:
    """All vmlinuz-* images in the given boot directories (default: :func:`kernel_dirs`), oldest first."""
    dirs = kernel_dirs() if boot_dirs is None else [boot_dirs] if isinstance(boot_dirs, Path) else boot_dirs
    found = []
    for boot in dirs:
        root = boot.parent if (boot.parent / ".complete").is_file() else None
        for image in boot.glob("vmlinuz-*"):
            release = image.name[len("vmlinuz-") :]
            series = series_of(release)
            if not series or not image.is_file() or release.endswith((".old", ".bak")):
                continue
            found.append(Kernel(series, release, image, root))
    return sorted(found, key=lambda k: _version_key(k.release))


def newest_per_series(kernels: list[Kernel]) -> dict[str, Kernel]:
    out: dict[str, Kernel] = {}
    for k in kernels:  # sorted ascending, so the last one of a series wins
        out[k.series] = k
    return out


def resolve_kernel(spec: str, boot_dirs: Path | list[Path] | None = None) -> Kernel | None:
    """A series ("6.1", "6.1-rt": newest of it), an exact release, or a vmlinuz path."""
    kernels = installed_kernels(boot_dirs)
    if "/" in spec:
        p = Path(spec)
        for k in kernels:
            if k.image == p:
                return k
        if p.is_file():
            release = p.name.replace("vmlinuz-", "", 1)
            root = p.parent.parent if (p.parent.parent / ".complete").is_file() else None
            return Kernel(series_of(release) or release, release, p, root)
        return None
    for k in kernels:
        if k.release == spec:
            return k
    return newest_per_series(kernels).get(spec)


def premerge_headers(kernels: list[Kernel], cache: Path = HEADER_CACHE) -> list[Path]:
    """Merge, on the host, every header pair the guests' tracers will look for.

    A guest's own /var/cache is a tmpfs, so the tracer there would merge its header tree over
    9p at its first start in every cell (minutes under TCG).  The guest script links the
    tracer's cache directory to ``cache`` instead, where these trees already are: the tracer
    finds them by the same two source directories and reuses them.  The pairs are the host's
    /usr/src ones and each unpacked kernel's own (its usr/src/, which the guest script links
    into the guest's /usr/src, so its /lib/modules/RELEASE/build resolves as when installed).
    """
    from closewait_trace.errors import CloseWaitError
    from closewait_trace.kernel.headers import candidate_header_dirs

    trees: list[Path] = []
    srcs = [Path("/usr/src")] + [k.root / "usr" / "src" for k in kernels if k.root is not None]
    for src in dict.fromkeys(srcs):
        try:
            found = candidate_header_dirs("none", modules_dir=Path("/nonexistent"), src_dir=src,
                                          cache_dir=cache)
        except CloseWaitError:
            continue
        trees += [c.path for c in found if c.path.is_relative_to(cache)]
    return trees


# ---------------------------------------------------------------- junit


@dataclass
class Counts:
    tests: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    #: each failed or erred test: its id and the first part of its message
    failures: list[str] = field(default_factory=list)


#: How much of a failed test's message the report repeats (the output log has all of it).
FAILURE_CHARS = 600
#: How many failed tests of a cell the report names (a failed shared fixture fails them all).
MAX_FAILURES_SHOWN = 10


def parse_junit(path: Path) -> Counts:
    """Sum the counts of every <testsuite> in a pytest junit XML file, and name its failed
    tests with their messages (raises on bad XML)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = Counts()
    for s in suites:
        c.tests += int(s.get("tests", 0))
        c.failed += int(s.get("failures", 0))
        c.errors += int(s.get("errors", 0))
        c.skipped += int(s.get("skipped", 0))
        c.failures += [_failure(case) for case in s.iter("testcase")
                       if case.find("failure") is not None or case.find("error") is not None]
    c.passed = c.tests - c.failed - c.errors - c.skipped
    return c


def _failure(case: ET.Element) -> str:
    bad = case.find("failure")
    if bad is None:
        bad = case.find("error")
    assert bad is not None
    message = " ".join((bad.get("message") or bad.text or "").split())
    if len(message) > FAILURE_CHARS:
        message = message[:FAILURE_CHARS] + " ..."
    return visible(f"{case.get('classname', '')}::{case.get('name', '')}: {message}")


# ---------------------------------------------------------------- tools


def find_vng(explicit: str | None = None) -> Path | None:
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    candidates = [os.environ.get("VNG"), str(REPO / ".venv" / "bin" / "vng"),
                  str(REPO / ".venv-vm" / "bin" / "vng")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    w = shutil.which("vng")
    return Path(w) if w else None


def vng_version(vng: Path) -> str:
    try:
        out = subprocess.run([str(vng), "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace {name} placeholders; leaves every other brace (e.g. ${VAR}) alone."""
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    kernel_spec: str
    backend: str
    kernel: Kernel | None
    dir: Path
    #: this cell runs the tests marked per_kernel (CLOSEWAIT_VM_PER_KERNEL=1): one per kernel
    per_kernel: bool = True
    #: this cell's own guest variables (--cell-env), after the common --env ones
    env: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.kernel_spec}-{self.backend}"


def assign_per_kernel(cells: list[Cell]) -> list[Cell]:
    """Give each kernel one cell for the per_kernel tests (its tracepoint cell, else its
    first), and order the cells for the pool: those cells first, since they run the most."""
    chosen: dict[str, Cell] = {}
    for cell in cells:
        best = chosen.get(cell.kernel_spec)
        if best is None or (cell.backend == "tracepoint" and best.backend != "tracepoint"):
            chosen[cell.kernel_spec] = cell
    for cell in cells:
        cell.per_kernel = chosen[cell.kernel_spec] is cell
    return sorted(cells, key=lambda c: not c.per_kernel)


@dataclass
class CellResult:
    kernel: str
    release: str
    backend: str
    result: str = "FAIL"
    reasons: list[str] = field(default_factory=list)
    passed: int | None = None
    failed: int | None = None
    skipped: int | None = None
    errors: int | None = None
    failures: list[str] = field(default_factory=list)
    boot_s: float | None = None  # guest uptime when the command started
    cmd_s: float | None = None  # guest time spent in the command
    wall_s: float = 0.0
    vng_rc: int | None = None
    exit_status: int | None = None
    dir: str = ""
    console_log: str = ""
    output_log: str = ""


_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()
_print_lock = threading.Lock()


def _say(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return kids


def _leaves(pid: int) -> list[int]:
    """Descendants of pid that have no children themselves (here: the QEMU process)."""
    kids = _children(pid)
    out: list[int] = []
    for k in kids:
        out += _leaves(k) or [k]
    return out


def _kill_group(p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """End vng and its QEMU (vng -> sh -> virtme-run -> qemu, one process group we started).

    The leaf (QEMU) goes first, so that virtme-run reaps it and the chain exits by itself
    (killing the group at once leaves a zombie QEMU to PID 1); then the whole group, in
    case anything is left."""
    for leaf in _leaves(p.pid):
        try:
            os.kill(leaf, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


#: seconds before --timeout at which the guest interrupts its command (and 60 s later kills it)
SOFT_GRACE = 120

GUEST_SCRIPT = """#!/bin/bash
# Generated by tests/vm/runner.py: runs inside the guest, writes results to R.
R={results}
cat /proc/uptime > "$R/guest-start-uptime"
{exports}
{prelude}cd {repo} || {{ echo 126 > "$R/exit-status"; exit 126; }}
# In a guest, SIGINT the command {grace}s before the runner's hard limit (guest uptime counts
# from boot): pytest then still prints its failures and writes its junit XML.
if grep -q virtme_ /proc/cmdline; then
  left=$(( {soft} - $(cut -d. -f1 /proc/uptime) )); [ "$left" -lt 60 ] && left=60
  timeout -s INT -k 60 "$left" bash "$R/cmd.sh" </dev/null 2>&1
else
  bash "$R/cmd.sh" </dev/null 2>&1
fi
rc=$?
cat /proc/uptime > "$R/guest-end-uptime"
echo "$rc" > "$R/exit-status"
sync
exit "$rc"
"""


def guest_prelude(kernel: Kernel, header_cache: Path = HEADER_CACHE,
                  hot_tar: Path | None = None) -> str:
    """Shell lines run in the guest before the command.

    The tracer's header cache (/var/cache is a tmpfs in the guest) points at the trees the
    runner merged on the host (:func:`premerge_headers`).  An unpacked kernel's header
    directories are linked into the guest's /usr/src (an overlay: the host is unchanged),
    where its /lib/modules/RELEASE/build link points, as when its packages are installed."""
    cache = shlex.quote(str(header_cache))
    lines = [f"  mkdir -p /var/cache/closewait-trace && ln -sfn {cache} /var/cache/closewait-trace/headers"]
    if kernel.root is not None:
        src = shlex.quote(str(kernel.root / "usr" / "src"))
        lines.append(f'  for d in {src}/*; do ln -sfn "$d" /usr/src/; done')
    if hot_tar is not None:
        lines += hotlayer.guest_lines(hot_tar, hotlayer.python_trees(REPO))
    # only in a virtme guest (never on a host running run.sh directly, as the unit tests do)
    return "if grep -q virtme_ /proc/cmdline; then\n" + "".join(x + "\n" for x in lines) + "fi\n"


#: virtme-ng's seven virtio-serial devices bring 31 ports and an ioeventfd per queue each:
#: QEMU's main loop polled ~390 descriptors at every guest timer tick (a whole host core
#: under TCG). Two ports per device and no ioeventfds (TCG gains nothing from them) cut the
#: time of three tracer starts in a 6.1 guest from 58 s to 52 s (and 75 s to 66 s in all).
QEMU_QUIET = ("-global virtio-serial-pci.ioeventfd=off -global virtio-9p-pci.ioeventfd=off"
              " -global virtio-serial-device.max_ports=2")


@dataclass
class Options:
    timeout: float
    cpus: str
    memory: str
    kvm: bool
    repo_overlay: bool
    require_junit: bool
    env: list[str]
    vng_extra: list[str]
    kheaders: str
    dry_run: bool
    #: the Python trees' tar for the guests' RAM (None: they read them over 9p)
    hot_tar: Path | None = None


def prepare_cell(cell: Cell, cmd: str, opts: Options, vng: Path) -> tuple[list[str], dict[str, str]]:
    """Write run.sh/cmd.sh into the cell directory; return vng's argv and environment."""
    assert cell.kernel is not None
    d = cell.dir
    shutil.rmtree(d, ignore_errors=True)  # a fresh cell directory: no stale exit status or junit
    d.mkdir(parents=True)
    values = {
        "backend": cell.backend,
        "kernel": cell.kernel.series,
        "release": cell.kernel.release,
        "results": str(d),
        "junit": str(d / "junit.xml"),
        "repo": str(REPO),
        "kheaders": opts.kheaders,
    }
    env = {
        "CLOSEWAIT_VM": "1",
        "CLOSEWAIT_VM_KERNEL": cell.kernel.series,
        "CLOSEWAIT_VM_RELEASE": cell.kernel.release,
        "CLOSEWAIT_VM_BACKEND": cell.backend,
        "CLOSEWAIT_VM_RESULTS": str(d),
        "CLOSEWAIT_VM_JUNIT": str(d / "junit.xml"),
        "CLOSEWAIT_VM_KHEADERS": opts.kheaders,
        "CLOSEWAIT_VM_PER_KERNEL": "1" if cell.per_kernel else "0",
    }
    for kv in [*opts.env, *cell.env]:
        k, _, v = kv.partition("=")
        env[k] = substitute(v, values)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    (d / "cmd.sh").write_text(substitute(cmd, values) + "\n")
    (d / "run.sh").write_text(GUEST_SCRIPT.format(
        results=shlex.quote(str(d)), exports=exports, repo=shlex.quote(str(REPO)),
        soft=max(60, int(opts.timeout) - SOFT_GRACE), grace=SOFT_GRACE,
        prelude=guest_prelude(cell.kernel, hot_tar=opts.hot_tar)))
    argv = [
        str(vng), "--run", str(cell.kernel.image),
        "--force-9p", "--user", "root",
        "--cpus", opts.cpus, "--memory", opts.memory,
        "--verbose",  # kernel console on stderr -> console.log
        "--rwdir", str(d),
    ]
    if not opts.kvm:
        argv.append("--disable-kvm")
    if opts.repo_overlay:
        argv += ["--overlay-rwdir", str(REPO)]
    argv.append(f"--qemu-opts={QEMU_QUIET}")  # one word: the value starts with a dash
    argv += opts.vng_extra
    argv += ["--exec", f"bash {d}/run.sh"]
    host_env = dict(os.environ)
    host_env["PATH"] = f"{vng.parent}{os.pathsep}{host_env.get('PATH', '')}"  # vng runs virtme-run
    (d / "host-tmp").mkdir(exist_ok=True)
    host_env["TMPDIR"] = str(d / "host-tmp")  # vng's initramfs / return-code temp files
    (d / "vng-cmd.txt").write_text(shlex.join(argv) + "\n")
    return argv, host_env


def run_cell(cell: Cell, cmd: str, opts: Options, vng: Path) -> CellResult:
    k = cell.kernel
    res = CellResult(kernel=cell.kernel_spec, release=k.release if k else "-", backend=cell.backend,
                     dir=str(cell.dir), console_log=str(cell.dir / "console.log"),
                     output_log=str(cell.dir / "output.log"))
    if k is None:
        res.reasons.append(f"kernel {cell.kernel_spec!r} is not installed in /boot nor unpacked in {KERNEL_CACHE} (scripts/setup.sh --vm)")
        return res
    argv, env = prepare_cell(cell, cmd, opts, vng)
    if opts.dry_run:
        _say(f"[{cell.name}] would run: {shlex.join(argv)}")
        res.result = "DRY-RUN"
        return res
    extra = f", with {' '.join(cell.env)}" if cell.env else ""
    _say(f"[{cell.name}] booting {k.release}{extra} (output: {res.output_log})")
    t0 = time.monotonic()
    timed_out = False
    with open(res.output_log, "wb") as out, open(res.console_log, "wb") as con:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=con, env=env,
                             cwd=str(REPO), start_new_session=True)
        with _running_lock:
            _running.add(p)
        try:
            res.vng_rc = p.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
        finally:
            with _running_lock:
                _running.discard(p)
    res.wall_s = time.monotonic() - t0
    shutil.rmtree(cell.dir / "host-tmp", ignore_errors=True)

    started = _read_float(cell.dir / "guest-start-uptime")
    ended = _read_float(cell.dir / "guest-end-uptime")
    res.boot_s = started
    if started is not None and ended is not None:
        res.cmd_s = ended - started
    status_text = ""
    try:
        status_text = (cell.dir / "exit-status").read_text().strip()
    except OSError:
        pass
    if status_text.isdigit():
        res.exit_status = int(status_text)

    if timed_out:
        res.reasons.append(f"timeout: killed after {opts.timeout:.0f}s"
                           + ("" if started is not None else " (command never started: boot hang)"))
    elif res.exit_status is None:
        if started is None:
            res.reasons.append(f"guest did not boot / never started the command (vng rc {res.vng_rc})")
        else:
            res.reasons.append(f"no exit status from guest (vng rc {res.vng_rc}; crash or panic?)")
    else:
        if res.exit_status != 0:
            res.reasons.append(f"command exited {res.exit_status}" + (
                f" (interrupted {SOFT_GRACE}s before the timeout)" if res.exit_status == 124 else ""))
        if res.vng_rc != res.exit_status:
            res.reasons.append(f"vng rc {res.vng_rc} != guest exit status {res.exit_status}")

    junit = cell.dir / "junit.xml"
    if junit.exists():
        try:
            c = parse_junit(junit)
            res.passed, res.failed, res.skipped, res.errors = c.passed, c.failed, c.skipped, c.errors
            res.failures = c.failures
            if c.failed or c.errors:
                res.reasons.append(f"junit: {c.failed} failed, {c.errors} errors")
        except (ET.ParseError, ValueError, OSError) as e:
            res.reasons.append(f"unreadable junit XML: {e}")
    elif opts.require_junit or "{junit}" in cmd:
        res.reasons.append("no junit XML written")

    res.result = "FAIL" if res.reasons else "PASS"
    _say(f"[{cell.name}] {res.result} in {res.wall_s:.0f}s"
         + (f": {'; '.join(res.reasons)}" if res.reasons else ""))
    return res


# ---------------------------------------------------------------- report


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.0f}s"
    return str(v)


def format_table(results: list[CellResult]) -> str:
    head = ["kernel", "release", "backend", "passed", "failed", "skipped", "errors", "boot", "cmd", "wall",
            "result"]
    rows = [[r.kernel, r.release, r.backend, _fmt(r.passed), _fmt(r.failed), _fmt(r.skipped),
             _fmt(r.errors), _fmt(r.boot_s), _fmt(r.cmd_s), _fmt(r.wall_s), r.result] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "    (missing)"
    return "\n".join("    | " + visible(x) for x in lines[-n:]) or "    (empty)"


def report(results: list[CellResult], logs: Path) -> None:
    print()
    print(format_table(results))
    failed = [r for r in results if r.result == "FAIL"]
    for r in failed:
        print(f"\nFAILED {r.kernel} x {r.backend}: {'; '.join(r.reasons)}")
        print(f"  console log: {r.console_log}")
        print(f"  output log:  {r.output_log}")
        print("  last lines of output:")
        print(_tail(r.output_log))
        if r.failures:
            print("  failed tests (junit XML):")
            print("\n".join(f"    {f}" for f in r.failures[:MAX_FAILURES_SHOWN]))
            if len(r.failures) > MAX_FAILURES_SHOWN:
                print(f"    ... and {len(r.failures) - MAX_FAILURES_SHOWN} more")
    n_pass = sum(r.result == "PASS" for r in results)
    print(f"\nvm matrix: {n_pass} passed, {len(failed)} failed (cells); logs in {logs}")


# ---------------------------------------------------------------- CLI


def parse_kernels(kernels: str, backends: str) -> list[tuple[str, list[str]]]:
    """``--kernels 5.10,6.1-rt:kprobe+tracepoint`` with ``--backends a,b``: each kernel with the
    backends after its colon (joined by +), else every one of ``--backends``."""
    default = [b.strip() for b in backends.split(",") if b.strip()]
    out = []
    for spec in [s.strip() for s in kernels.split(",") if s.strip()]:
        name, colon, own = spec.partition(":")
        out.append((name, [b for b in own.split("+") if b] if colon else default))
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m tests.vm.runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="show installed kernels and tools, then exit")
    p.add_argument("--kernels", default=DEFAULT_KERNELS,
                   help="comma list of kernel series (6.1, 6.1-rt), releases or vmlinuz paths, each "
                        "optionally with its own backends after a colon (6.1-rt:kprobe+tracepoint) "
                        "[%(default)s]")
    p.add_argument("--backends", default=DEFAULT_BACKENDS, help="comma list [%(default)s]")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="per-cell limit in seconds, boot included [%(default)s]")
    p.add_argument("--logs", type=Path, help=f"log/results directory [{DEFAULT_LOGS_ROOT}/TIMESTAMP]")
    p.add_argument("--jobs", "-j", type=int, default=1, help="guests run at once [%(default)s]")
    p.add_argument("--cpus", default="2", help="guest vCPUs [%(default)s]")
    p.add_argument("--memory", default="2G", help="guest memory [%(default)s]")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="extra guest environment variable (placeholders allowed in V); repeatable")
    p.add_argument("--cell-env", action="append", default=[], metavar="CELL:K=V",
                   help="a guest variable for one cell only, e.g."
                   " 6.1-fentry:CLOSEWAIT_FORCE_PERF_BUFFER=1; repeatable")
    p.add_argument("--require-junit", action="store_true",
                   help="fail a cell without junit XML even if CMD does not mention {junit}")
    p.add_argument("--no-repo-overlay", dest="repo_overlay", action="store_false",
                   help="leave the repository read-only in the guest")
    p.add_argument("--kvm", action="store_true", help="allow KVM (default: --disable-kvm, TCG)")
    p.add_argument("--no-kheaders", dest="kheaders", action="store_false",
                   help="do not build the merged header trees ({kheaders}, the guests' tracer cache)")
    p.add_argument("--no-hot-layer", dest="hot_layer", action="store_false",
                   help="leave the guests' Python trees on 9p (default: a RAM copy, hotlayer.py)")
    p.add_argument("--vng", help="path of vng [.venv/bin/vng, .venv-vm/bin/vng, PATH]")
    p.add_argument("--vng-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for vng (repeatable), e.g. --vng-arg=--append=nokaslr")
    p.add_argument("--dry-run", action="store_true", help="write the guest scripts, print vng commands")
    return p


def do_list(vng: Path | None) -> int:
    kernels = installed_kernels()
    newest = newest_per_series(kernels)
    print("installed kernels (/boot/vmlinuz-*):")
    for k in kernels:
        mark = "  <- used for " + k.series if newest.get(k.series) == k else ""
        print(f"  {k.series:7} {k.release:28} {k.image}{mark}")
    if not kernels:
        print("  none (run scripts/setup.sh --vm)")
    print(f"vng: {vng or 'NOT FOUND (run scripts/setup.sh --vm)'}" + (f" ({vng_version(vng)})" if vng else ""))
    print(f"qemu-system-x86_64: {shutil.which('qemu-system-x86_64') or 'NOT FOUND'}")
    print(f"unpacked kernels: {KERNEL_CACHE} (scripts/vm-kernels.sh)")
    pair = _kheaders.find_header_pair("6.1")
    print(f"6.1 headers for BCC: {' + '.join(map(str, pair)) if pair else 'none'}")
    return 0


def _hot_tar() -> Path | None:
    """The Python trees' tar for the guests (hotlayer.py), this run's own; None, and a
    warning, if it cannot be made (the guests then read the trees over 9p, only slower)."""
    t = time.monotonic()
    try:
        tar = hotlayer.build(HOT_DIR, hotlayer.python_trees(REPO))
    except (OSError, subprocess.SubprocessError) as e:
        print(f"runner: warning: no hot layer for the guests: {e}", file=sys.stderr)
        return None
    print(f"runner: Python trees for the guests' RAM in {tar} ({tar.stat().st_size >> 20} MiB,"
          f" {time.monotonic() - t:.1f}s)")
    return tar


def main(argv: list[str] | None = None) -> int:
    own, cmd_words = _split_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(own)
    vng = find_vng(args.vng)
    if args.list:
        return do_list(vng)
    if not cmd_words:
        parser.error("no command: put it after --")
    cmd = " ".join(cmd_words)
    if vng is None:
        print("runner: vng not found; run scripts/setup.sh --vm", file=sys.stderr)
        return 2
    if (not args.dry_run and shutil.which("qemu-system-x86_64") is None
            and os.environ.get("CLOSEWAIT_VM_SKIP_QEMU_CHECK") != "1"):  # unit tests, fake vng
        print("runner: qemu-system-x86_64 not found; run scripts/setup.sh --vm", file=sys.stderr)
        return 2
    for kv in args.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
            parser.error(f"--env wants K=V, got {kv!r}")
    for spec in args.cell_env:
        if not re.match(r"^[^:=\s]+:[A-Za-z_][A-Za-z0-9_]*=", spec):
            parser.error(f"--cell-env wants CELL:K=V, got {spec!r}")

    logs = (args.logs or DEFAULT_LOGS_ROOT / time.strftime("%Y%m%d-%H%M%S")).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    if not _SAFE_PATH.match(str(logs)):
        parser.error(f"--logs path {logs} has characters vng --rwdir cannot take")

    kheaders = ""
    if args.kheaders:
        t = time.monotonic()
        tree = _kheaders.merged_tree("6.1")
        kheaders = str(tree) if tree else ""
        if tree:
            print(f"runner: 6.1 header tree {tree} ({time.monotonic() - t:.1f}s)")

    cells = []
    for ks, backends in parse_kernels(args.kernels, args.backends):
        k = resolve_kernel(ks)
        for b in backends:
            label = ks if "/" not in ks else (k.release if k else Path(ks).name)
            cells.append(Cell(label, b, k, logs / re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{label}-{b}")))
    if not cells:
        parser.error("no cells: empty --kernels or --backends")
    cells = assign_per_kernel(cells)
    for spec in args.cell_env:
        name, _, kv = spec.partition(":")
        targets = [c for c in cells if c.name == name]
        if not targets:
            parser.error(f"--cell-env {spec!r}: no cell {name} (cells: "
                         f"{', '.join(c.name for c in cells)})")
        targets[0].env.append(kv)
    hot_tar = None  # made once the arguments are known to be good; removed at the end
    if args.hot_layer:
        hot_tar = HOT_DIR / "python-dry-run.tar" if args.dry_run else _hot_tar()
    opts = Options(timeout=args.timeout, cpus=args.cpus, memory=args.memory, kvm=args.kvm,
                   repo_overlay=args.repo_overlay, require_junit=args.require_junit, env=args.env,
                   vng_extra=args.vng_arg, kheaders=kheaders, dry_run=args.dry_run,
                   hot_tar=hot_tar)
    if args.kheaders and not args.dry_run:
        t = time.monotonic()
        trees = premerge_headers([c.kernel for c in cells if c.kernel is not None])
        print(f"runner: header trees for the guests' tracers in {HEADER_CACHE}: "
              f"{', '.join(p.name for p in trees) or 'none'} ({time.monotonic() - t:.1f}s)")
    print(f"runner: {len(cells)} cell(s), vng {vng} ({vng_version(vng)}), jobs {args.jobs}, "
          f"timeout {args.timeout:.0f}s, logs {logs}")

    try:
        vcpus = args.jobs * int(args.cpus)
    except ValueError:
        vcpus = 0
    if args.jobs > 1 and vcpus > (os.cpu_count() or 1):
        print(f"runner: warning: {args.jobs} guests x {args.cpus} vCPUs > {os.cpu_count()} host CPUs; "
              "TCG guests then run slower than one at a time (use --cpus 1 with --jobs 2)",
              file=sys.stderr)
    t0 = time.monotonic()
    try:
        if args.jobs <= 1:
            results = [run_cell(c, cmd, opts, vng) for c in cells]
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as ex:
                results = list(ex.map(lambda c: run_cell(c, cmd, opts, vng), cells))
    except KeyboardInterrupt:
        with _running_lock:
            for p in list(_running):
                _kill_group(p, grace=3)
        print("runner: interrupted; guests killed", file=sys.stderr)
        return 130
    finally:
        if hot_tar is not None and not args.dry_run:
            hot_tar.unlink(missing_ok=True)
    total = time.monotonic() - t0
    if args.dry_run:
        return 0
    (logs / "summary.json").write_text(json.dumps(
        {"command": cmd, "vng": str(vng), "vng_version": vng_version(vng), "jobs": args.jobs,
         "total_s": total, "cells": [asdict(r) for r in results]}, indent=2) + "\n")
    report(results, logs)
    print(f"total wall time {total:.0f}s")
    return 0 if all(r.result == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
