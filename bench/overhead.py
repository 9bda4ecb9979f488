#!/usr/bin/env python3
"""Overhead benchmark: what tracing costs a server that accepts as many connections as it can.

    sudo .venv/bin/python -m bench.overhead [--rounds 5] [--duration 10] [--quick]
                                            [--only none,closewait,...] [--output FILE]

Starts its own nginx on 127.0.0.1 (1 worker, `return 200 "ok"`), loads it with wrk sending
`Connection: close` (so every request is a new TCP connection), once with no tracer and once
under each tracer, in alternating rounds whose order rotates each round. For each run it
measures wrk's requests/s (= connections/s), the tracer's CPU time during the load (share of
one core), its peak RSS, and the events it lost. It writes a markdown report (default
bench/results/overhead-<date>.md, plus the raw numbers as .json next to it) and prints it.

Installs nothing: it says what `scripts/setup.sh --bench` would install. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bench.load import status_kb

if TYPE_CHECKING:
    from bench.load import Role

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# Targets the project states for closewait-trace (reported, not enforced).
TARGET_SLOWDOWN_PCT = 3.0
TARGET_CPU_PCT = 5.0

# tool -> Debian package that provides it
TOOL_PACKAGES = {
    "nginx": "nginx-light (or nginx)",
    "wrk": "wrk",
    "tcpstates-bpfcc": "bpfcc-tools",
    "tcplife-bpfcc": "bpfcc-tools",
}
SETUP_HINT = "sudo scripts/setup.sh --bench  (installs nginx-light and wrk; bpfcc-tools comes with every setup)"


class BenchError(Exception):
    """One clear line for the user; exit code 2."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_tool(name: str) -> str | None:
    """`which`, also looking in the sbin directories a non-root PATH lacks."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    got = text.strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in got) if got else "    (empty)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loadavg() -> tuple[float, float, float]:
    a, b, c = Path("/proc/loadavg").read_text().split()[:3]
    return float(a), float(b), float(c)


def fmt_load(la: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in la)


def _set_pdeathsig() -> None:
    """In the child before exec: die (SIGTERM) if the benchmark dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# /proc accounting
# --------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    return raw[raw.rfind(")") + 2:].split()


def descendants(root: int) -> list[int]:
    """Live descendants of a process (from the ppid of every /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_cpu_s(pid: int) -> float:
    """utime+stime (+ reaped children's) of a process and its live descendants, in seconds."""
    total = 0
    for p in [pid, *descendants(pid)]:
        f = _stat_fields(p)
        if f is None:
            continue
        # after the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def _tree_status_mb(pid: int, key: str) -> float | None:
    kbs = [status_kb(p, key) for p in [pid, *descendants(pid)]]
    known = [k for k in kbs if k is not None]
    return sum(known) / 1024 if known else None


def tree_hwm_mb(pid: int) -> float | None:
    """Peak RSS (VmHWM) of a process plus that of its live descendants, in MB."""
    return _tree_status_mb(pid, "VmHWM")


def tree_rss_mb(pid: int) -> float | None:
    """RSS now (VmRSS) of a process plus that of its live descendants, in MB."""
    return _tree_status_mb(pid, "VmRSS")


@dataclass
class CpuTimes:
    total: int
    idle: int
    steal: int

    @staticmethod
    def read() -> CpuTimes:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal guest guest_nice
                # (guest time is already counted in user)
                total = sum(v[:8])
                return CpuTimes(total=total, idle=v[3] + v[4], steal=v[7] if len(v) > 7 else 0)
        raise BenchError("cannot read /proc/stat")


def fds_of(pid: int, target: str) -> int | None:
    """How many of a process's fds point to `target` (an anon inode such as
    "anon_inode:bpf-prog"); None once the process is gone."""
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    n = 0
    for fd in fds:
        try:
            n += os.readlink(fd.path) == target
        except OSError:
            continue
    return n


def perf_event_fds(pid: int) -> int | None:
    """Number of perf_event fds a process holds (BCC: one per attached tracepoint and one per
    CPU of an open perf buffer); None once the process is gone."""
    return fds_of(pid, "anon_inode:[perf_event]")


def bpf_prog_stats(pid: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over the BPF programs a process holds (fdinfo; counted
    only while kernel.bpf_stats_enabled is 1)."""
    seen: dict[str, tuple[int, int]] = {}
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return 0, 0
    for fd in fds:
        try:
            if os.readlink(fd.path) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        pid_key = info.get("prog_id", fd.name).strip()
        seen[pid_key] = (int(info.get("run_time_ns", "0")), int(info.get("run_cnt", "0")))
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


TRACER_PATTERNS = ("closewait_trace", "closewait-trace", "-bpfcc", "bpftrace", "qemu-system")


def _bpf_prog_fds(pid: int) -> int:
    return fds_of(pid, "anon_inode:bpf-prog") or 0


def foreign_processes(own: set[int]) -> list[str]:
    """Other tracers (by name, or holding BPF programs) and VMs running on the machine:
    they skew every number here, the no-tracer baseline included."""
    me = os.getpid()
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me or pid in own:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        cmd = " ".join(a.decode(errors="replace") for a in argv if a)
        if not cmd or "bench.overhead" in cmd or "bench/overhead.py" in cmd:
            continue
        exe = cmd.split()[0]
        head = " ".join(cmd.split()[:5])
        progs = _bpf_prog_fds(pid)
        if progs or any(p in head for p in TRACER_PATTERNS) or "qemu-system" in exe:
            out.append(f"{pid} {head[:100]}" + (f" [{progs} BPF progs]" if progs else ""))
    return out


# --------------------------------------------------------------------------------------------
# Child processes: every one is registered, and all are stopped on any exit
# --------------------------------------------------------------------------------------------
class Children:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def pids(self) -> set[int]:
        out: set[int] = set()
        for _, p in self.procs:
            out.add(p.pid)
            out.update(descendants(p.pid))
        return out

    def spawn(self, label: str, argv: Sequence[str], *, stdout: IO[Any] | int | None = None,
              stderr: IO[Any] | int | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen[bytes]:
        # Own session: a Ctrl-C on the terminal reaches only us; we stop the children in order.
        p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             env=env, cwd=cwd, start_new_session=True,
                             preexec_fn=_set_pdeathsig)
        self.procs.append((label, p))
        return p

    def forget(self, p: subprocess.Popen[bytes]) -> None:
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 10.0) -> tuple[int | None, bool]:
        """Signal a child, wait; SIGKILL its whole process group after the timeout.
        Returns (exit code, whether it had to be killed)."""
        killed = False
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                killed = True
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait()
        # Anything left in its group (e.g. nginx workers) goes too.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.forget(p)
        return p.returncode, killed

    def stop_all(self) -> None:
        for label, p in reversed(list(self.procs)):
            if p.poll() is None:
                log(f"stopping {label} (pid {p.pid})")
            self.stop(p, signal.SIGTERM, timeout=5.0)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 16384;
}}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, binary: str, children: Children, workdir: Path) -> None:
        self.binary = binary
        self.children = children
        self.dir = workdir / "nginx"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _argv(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"),
                "-e", str(self.dir / "error.log"), *extra]

    def start(self) -> None:
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        v = subprocess.run([self.binary, "-v"], capture_output=True, text=True)
        self.version = (v.stderr or v.stdout).strip().replace("nginx version: ", "")
        self.port = free_port()
        conf = NGINX_CONF.format(d=self.dir, port=self.port)
        # Drop the *_temp_path lines of modules this build lacks (nginx-light has fewer).
        for _ in range(6):
            (self.dir / "nginx.conf").write_text(conf)
            t = subprocess.run(self._argv("-t", "-q"), capture_output=True, text=True)
            if t.returncode == 0:
                break
            m = re.search(r'unknown directive "(\w+)"', t.stderr)
            if not m:
                raise BenchError(f"nginx rejects the generated config: {t.stderr.strip()}")
            conf = "\n".join(line for line in conf.splitlines()
                             if not line.strip().startswith(m.group(1) + " ")) + "\n"
        else:
            raise BenchError("nginx rejects the generated config")
        out = open(self.dir / "stdout.log", "wb")
        self.proc = self.children.spawn("nginx", self._argv(), stdout=out, stderr=out)
        out.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited at start (code {self.proc.returncode}):\n"
                                 f"{tail(self.dir / 'error.log')}\n{tail(self.dir / 'stdout.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"nginx did not listen on 127.0.0.1:{self.port} within 10 s:\n"
                         f"{tail(self.dir / 'error.log')}")

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"nginx died:\n{tail(self.dir / 'error.log')}")

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------
@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float  # wall time wrk ran
    cpu_s: float  # wrk's own user+sys time
    socket_errors: dict[str, int]
    non_2xx: int
    output: str


def wrk_argv(wrk: str, threads: int, conns: int, duration: float, url: str) -> list[str]:
    return [wrk, f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", "5s",
            "-H", "Connection: close", url]


def run_wrk(children: Children, argv: list[str], workdir: Path) -> WrkResult:
    outpath = workdir / "wrk.out"
    with open(outpath, "wb") as out:
        p = children.spawn("wrk", argv, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    except BaseException:
        children.stop(p)
        raise
    seconds = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    children.forget(p)
    text = outpath.read_text(errors="replace")
    if p.returncode != 0:
        raise BenchError(f"wrk failed (exit {p.returncode}): {' '.join(argv)}\n{text.strip()}")
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    n = re.search(r"(\d+) requests in", text)
    if not m or not n:
        raise BenchError(f"cannot read wrk's output:\n{text.strip()}")
    errs: dict[str, int] = {}
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if e:
        errs = dict(zip(("connect", "read", "write", "timeout"), map(int, e.groups())))
    x = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(rps=float(m.group(1)), requests=int(n.group(1)), seconds=seconds,
                     cpu_s=ru.ru_utime + ru.ru_stime, socket_errors=errs,
                     non_2xx=int(x.group(1)) if x else 0, output=text)


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    kind: str  # "none" | "closewait" | "floor" | "bcc"
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    @property
    def command(self) -> str:
        if self.kind == "none":
            return "(no tracer)"
        shown = [Path(self.argv[0]).name if self.kind == "bcc" else _short(self.argv[0]),
                 *self.argv[1:]]
        return " ".join(shlex.quote(a) for a in shown)


def _short(path: str) -> str:
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


# Run by default, in this order (rotated each round).
DEFAULT_CONFIGS = ("none", "closewait", "closewait-timeline", "floor", "tcpstates", "tcplife")
# Also available with --only: the timeline of *every* socket (meant for use with filters).
ALL_CONFIGS = (*DEFAULT_CONFIGS, "closewait-timeline-all", "closewait-while-needed",
               "closewait-classic", "floor-raw", "floor-cw", "empty", "empty-raw")
# closewait configurations with more options: name -> (the option they need, its arguments)
CLOSEWAIT_VARIANTS = {
    "closewait-timeline": ("--timeline", ["--timeline"]),
    "closewait-timeline-all": ("--timeline", ["--timeline", "all"]),
    # the accept watch attached for the whole of an incident (auto samples it after 30 s)
    "closewait-while-needed": ("--accept-watch", ["--accept-watch", "while-needed"]),
}
# bench.floor's configurations: name -> its arguments.
FLOOR_CONFIGS = {"floor": (), "floor-raw": ("--raw",), "floor-cw": ("--cw-only", "--raw"),
                 "empty": ("--empty",), "empty-raw": ("--empty", "--raw")}


def find_closewait(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    venv = REPO / ".venv" / "bin" / "closewait-trace"
    if venv.exists():
        return str(venv)
    return shutil.which("closewait-trace")


def closewait_has_option(binary: str, option: str) -> bool:
    try:
        r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(rf"(^|\s){re.escape(option)}[\s,=]", r.stdout) is not None


# What tcpstates/tcplife include: enough to hit the header trees BCC 0.26 cannot compile
# against (Debian's 6.12: incomplete struct bpf_rb_node/bpf_refcount in linux/bpf.h).
_PROBE_PROGRAM = (
    "#include <uapi/linux/ptrace.h>\n#include <linux/tcp.h>\n#include <net/sock.h>\n"
    "#include <bcc/proto.h>\nint probe(void *ctx) { return 0; }\n"
)


def _bcc_python(tool: str | None) -> str:
    """The interpreter a BCC tool runs with (its shebang), which has the bcc module."""
    if tool:
        try:
            with open(tool, "rb") as f:
                first = f.readline().decode(errors="replace")
            if first.startswith("#!"):
                parts = first[2:].split()
                if parts and Path(parts[0]).name != "env":
                    return parts[0]
        except OSError:
            pass
    return "/usr/bin/python3"


def _bcc_compiles(python: str, src: str | None) -> tuple[bool, str]:
    env = dict(os.environ)
    if src:
        env["BCC_KERNEL_SOURCE"] = src
    else:
        env.pop("BCC_KERNEL_SOURCE", None)
    code = "import sys\nfrom bcc import BPF\nBPF(text=sys.stdin.read())\n"
    try:
        r = subprocess.run([python, "-c", code], input=_PROBE_PROGRAM, capture_output=True,
                           text=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    errs = [ln.strip() for ln in r.stderr.splitlines() if "error:" in ln]
    return r.returncode == 0, (errs[0] if errs else r.stderr.strip()[-200:])


def bcc_kernel_source(explicit: str | None, tool: str | None = None) -> tuple[str | None, str]:
    """A header tree for BCC's own tools (they refuse to compile without one): the first
    candidate, found as closewait-trace finds its own, that compiles what they include."""
    if explicit:
        return explicit, f"BCC_KERNEL_SOURCE={explicit} (--kernel-headers)"
    if os.environ.get("BCC_KERNEL_SOURCE"):
        v = os.environ["BCC_KERNEL_SOURCE"]
        return v, f"BCC_KERNEL_SOURCE={v} (from the environment)"
    if Path(f"/lib/modules/{platform.release()}/build").exists():
        return None, "BCC tools use the running kernel's headers"
    try:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from closewait_trace.kernel.headers import candidate_header_dirs

        cands = candidate_header_dirs()
    except Exception as exc:  # noqa: BLE001 - any failure means "none found"
        return None, f"no kernel headers found for the BCC tools ({exc})"
    if not cands:
        return None, "no kernel headers found for the BCC tools"
    python = _bcc_python(tool)
    rejected: list[str] = []
    for cand in cands:
        ok, why = _bcc_compiles(python, str(cand.path))
        if ok:
            skipped = f"; skipped {'; '.join(rejected)}" if rejected else ""
            return str(cand.path), (f"BCC tools compile against {cand.version} headers "
                                    f"(BCC_KERNEL_SOURCE={cand.path}, the first of closewait-"
                                    f"trace's candidates that BCC compiles{skipped})")
        rejected.append(f"{cand.version} ({why[:120]})")
    return str(cands[0].path), ("no header tree compiles the BCC tools' includes: "
                                + "; ".join(rejected))


def _wanted(args: argparse.Namespace) -> list[str]:
    if not args.only:
        return list(DEFAULT_CONFIGS)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in wanted if c not in ALL_CONFIGS]
    if bad:
        raise BenchError(f"unknown config {', '.join(bad)} in --only; "
                         f"choose from {', '.join(ALL_CONFIGS)}")
    return wanted


def _find_tools(args: argparse.Namespace, wanted: list[str]) -> tuple[dict[str, str], str | None]:
    """The paths of the tools the configurations need (and of closewait-trace); one error
    naming every missing one and its package."""
    needs_tools = {"nginx", "wrk"} | {f"{c}-bpfcc" for c in ("tcpstates", "tcplife")
                                       if c in wanted}
    missing: dict[str, str] = {}
    paths: dict[str, str] = {}
    for tool in sorted(needs_tools):
        found = find_tool(tool)
        if found:
            paths[tool] = found
        else:
            missing[tool] = TOOL_PACKAGES[tool]
    cw = None
    if any(c.startswith("closewait") for c in wanted):
        cw = find_closewait(args.closewait_trace)
        if not cw:
            missing["closewait-trace"] = "the project's venv (make setup)"
    if missing:
        pkgs = sorted({v for v in missing.values()})
        raise BenchError(f"missing {', '.join(sorted(missing))} (from {', '.join(pkgs)}): "
                         f"run {SETUP_HINT}")
    return paths, cw


def _config(name: str, cw: str | None, paths: dict[str, str], bcc_env: dict[str, str] | None,
            notes: list[str], cw_args: Sequence[str] = ()) -> Config | None:
    """One configuration; ``cw_args`` (--closewait-arg) end every closewait-trace command."""
    if name == "none":
        return Config("none", "none")
    if name == "closewait":
        assert cw
        return Config("closewait", "closewait", [cw, "--json", *cw_args])
    if name == "closewait-classic":  # state changes from the classic tracepoint (its fallback)
        assert cw
        from closewait_trace.kernel.kfields import CLASSIC_TRACEPOINT_ENV
        return Config(name, "closewait", [cw, "--json", *cw_args],
                      {**os.environ, CLASSIC_TRACEPOINT_ENV: "1"})
    if name in CLOSEWAIT_VARIANTS:
        assert cw
        option, extra = CLOSEWAIT_VARIANTS[name]
        if closewait_has_option(cw, option):
            return Config(name, "closewait", [cw, "--json", *extra, *cw_args])
        notes.append(f"{name} skipped: this closewait-trace has no {option} "
                     "option (`closewait-trace --help`)")
        return None
    if name in FLOOR_CONFIGS:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        return Config(name, "floor", [sys.executable, "-m", "bench.floor", *FLOOR_CONFIGS[name]],
                      env)
    return Config(name, "bcc", [paths[f"{name}-bpfcc"]], bcc_env)


def build_configs(args: argparse.Namespace, notes: list[str]) -> list[Config]:
    wanted = _wanted(args)
    paths, cw = _find_tools(args, wanted)
    args.nginx_bin, args.wrk_bin = paths["nginx"], paths["wrk"]
    bcc_env: dict[str, str] | None = None
    if "tcpstates" in wanted or "tcplife" in wanted:
        src, why = bcc_kernel_source(args.kernel_headers,
                                     paths.get("tcpstates-bpfcc") or paths.get("tcplife-bpfcc"))
        notes.append(why)
        if src:
            bcc_env = {**os.environ, "BCC_KERNEL_SOURCE": src}
    configs = [c for c in (_config(name, cw, paths, bcc_env, notes, args.closewait_arg)
                            for name in wanted) if c]
    if not configs:
        raise BenchError("nothing to run")
    return configs


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
@dataclass
class Run:
    config: str
    round: int
    position: int
    conn_s: float | None = None
    requests: int | None = None
    load_s: float | None = None
    wrk_errors: int = 0
    non_2xx: int = 0
    tracer_cpu_pct: float | None = None
    tracer_rss_mb: float | None = None
    bpf_cpu_pct: float | None = None  # --bpf-stats: time in the tracer's BPF programs
    bpf_runs_per_s: float | None = None
    bpf_ns_per_conn: float | None = None  # --bpf-stats: BPF run time / connections served
    tracer_rss_steady_mb: float | None = None  # VmRSS at the end of the load
    tracer_bpf_progs: int | None = None  # BPF programs the tracer held when the load started
    incident_setup_s: float | None = None  # --incident: seconds to make the leaks
    events_lost: int | None = None
    lost_detail: dict[str, Any] | None = None
    cw_entered: int | None = None
    backend: str | None = None  # closewait-trace's summary: the backend that ran
    accepts_seen: int | None = None  # its summary: accepts the kernel side saw / could not tie
    accepts_unmatched: int | None = None
    events_printed: int | None = None
    ready_s: float | None = None
    stop_s: float | None = None
    machine_busy_pct: float | None = None
    steal_pct: float | None = None
    nginx_cpu_pct: float | None = None
    wrk_cpu_pct: float | None = None
    load1: float | None = None
    foreign: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class TracerFailed(Exception):
    pass


def _read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _wait_ready(cfg: Config, p: subprocess.Popen[bytes], out: Path, err: Path,
                timeout: float) -> float:
    """Block until the tracer is attached; return how long that took."""
    t0 = time.monotonic()
    stable_since, last = 0.0, -1
    while True:
        elapsed = time.monotonic() - t0
        if p.poll() is not None:
            raise TracerFailed(f"{cfg.name} exited with code {p.returncode} before it was ready; "
                               f"stderr tail:\n{tail(err)}\nstdout tail:\n{tail(out, 5)}")
        if elapsed > timeout:
            raise TracerFailed(f"{cfg.name} not ready after {timeout:.0f} s; stderr tail:\n"
                               f"{tail(err)}")
        if cfg.kind in ("closewait", "floor"):
            # closewait-trace and bench/floor.py print {"type": "ready", ...} once attached.
            if any(o.get("type") == "ready" for o in _read_json_lines(out)):
                return elapsed
        else:
            # BCC tools: attached at BPF(), then print a header, then open the perf buffer
            # (one perf_event fd per CPU). Their stdout is block-buffered in a file, so watch
            # the fds instead: ready when >= 1 + NCPU perf_event fds and stable for 1 s.
            n = perf_event_fds(p.pid) or 0
            now = time.monotonic()
            if n != last:
                last, stable_since = n, now
            elif n >= 1 + NCPU and now - stable_since >= 1.0:
                return elapsed
        time.sleep(0.1)


@dataclass(frozen=True)
class Bench:
    """What every run of one benchmark shares: its settings, child processes and server."""

    args: argparse.Namespace
    children: Children
    nginx: Nginx
    workdir: Path


@dataclass
class Sample:
    """Counters read just before and just after the load of one run."""

    cpu: CpuTimes
    nginx_cpu_s: float
    tracer_cpu_s: float
    bpf: tuple[int, int]  # (run_time_ns, run_cnt) of the tracer's BPF programs

    @staticmethod
    def take(bench: Bench, tracer: subprocess.Popen[bytes] | None) -> Sample:
        nginx = bench.nginx.proc
        stats = bpf_prog_stats(tracer.pid) if tracer and bench.args.bpf_stats else (0, 0)
        return Sample(cpu=CpuTimes.read(),
                      nginx_cpu_s=tree_cpu_s(nginx.pid) if nginx else 0.0,
                      tracer_cpu_s=tree_cpu_s(tracer.pid) if tracer else 0.0, bpf=stats)


def _record_load(run: Run, res: WrkResult, before: Sample, after: Sample) -> None:
    run.conn_s, run.requests, run.load_s = res.rps, res.requests, res.seconds
    run.wrk_errors, run.non_2xx = sum(res.socket_errors.values()), res.non_2xx
    if res.socket_errors and run.wrk_errors:
        run.notes.append("wrk socket errors " + ", ".join(
            f"{k} {v}" for k, v in res.socket_errors.items() if v))
    if res.non_2xx:
        run.notes.append(f"{res.non_2xx} non-2xx responses")
    run.nginx_cpu_pct = 100 * (after.nginx_cpu_s - before.nginx_cpu_s) / res.seconds
    run.wrk_cpu_pct = 100 * res.cpu_s / res.seconds
    dt_total = max(1, after.cpu.total - before.cpu.total)
    run.machine_busy_pct = 100 * (1 - (after.cpu.idle - before.cpu.idle) / dt_total)
    run.steal_pct = 100 * (after.cpu.steal - before.cpu.steal) / dt_total


def _record_tracer(run: Run, res: WrkResult, before: Sample, after: Sample,
                   tracer: subprocess.Popen[bytes], bpf_stats: bool) -> None:
    run.tracer_cpu_pct = 100 * (after.tracer_cpu_s - before.tracer_cpu_s) / res.seconds
    if bpf_stats:
        ns, cnt = after.bpf[0] - before.bpf[0], after.bpf[1] - before.bpf[1]
        run.bpf_cpu_pct = 100 * ns / 1e9 / res.seconds
        run.bpf_runs_per_s = cnt / res.seconds
        run.bpf_ns_per_conn = ns / res.requests if res.requests else None
    run.tracer_rss_mb = tree_hwm_mb(tracer.pid)
    run.tracer_rss_steady_mb = tree_rss_mb(tracer.pid)


def _read_outcome(cfg: Config, run: Run, out: Path, err: Path, code: int | None) -> None:
    """What the tracer said about itself: closewait-trace's summary record, or the BCC tools'
    lost-sample lines and output size."""
    if cfg.kind == "closewait":
        summary = None
        for obj in _read_json_lines(out):
            if obj.get("type") == "summary":
                summary = obj
        if summary is None:
            run.notes.append(f"no summary record (exit code {code}); stderr tail: "
                             + tail(err, 3).strip())
            return
        run.events_lost = int(summary.get("events_lost", 0))
        run.lost_detail = summary.get("lost")
        run.cw_entered = summary.get("cw_entered")
        run.backend = summary.get("backend")
        run.accepts_seen = summary.get("accepts_seen")
        run.accepts_unmatched = summary.get("accepts_unmatched")
        if code not in (0, None):
            run.notes.append(f"exit code {code}")
    elif cfg.kind == "bcc":
        # BCC's perf reader prints "Possibly lost N samples" when no lost callback is set.
        errtext = err.read_text(errors="replace") if err.exists() else ""
        run.events_lost = sum(int(n) for n in re.findall(r"[Ll]ost (\d+) samples", errtext))
        with open(out, "rb") as f:
            run.events_printed = max(0, sum(1 for _ in f) - 1)  # minus the header
        other = [ln for ln in errtext.splitlines()
                 if ln.strip() and not re.search(r"[Ll]ost \d+ samples", ln)]
        if other:
            run.notes.append("stderr: " + " | ".join(other[-2:])[:200])


def _stop_tracer(bench: Bench, run: Run, tracer: subprocess.Popen[bytes]) -> int | None:
    timeout = bench.args.stop_timeout
    t_stop = time.monotonic()
    code, killed = bench.children.stop(tracer, signal.SIGTERM, timeout=timeout)
    run.stop_s = time.monotonic() - t_stop
    if killed:
        run.notes.append(f"did not exit within {timeout:.0f} s of SIGTERM: killed")
    return code


def _under_load(bench: Bench, run: Run, cfg: Config, tracer: subprocess.Popen[bytes] | None
                ) -> tuple[WrkResult, Sample, Sample]:
    """The load of one run, with the incident's leaks open during it when asked for."""
    args = bench.args
    argv = wrk_argv(args.wrk_bin, args.threads, args.connections, args.duration,
                    bench.nginx.url)
    with incident(bench, run, cfg, tracer):
        if tracer is not None:
            run.tracer_bpf_progs = _bpf_prog_fds(tracer.pid)
        before = Sample.take(bench, tracer)
        res = run_wrk(bench.children, argv, bench.workdir)
        after = Sample.take(bench, tracer)
    return res, before, after


def run_one(cfg: Config, rnd: int, pos: int, bench: Bench) -> Run:
    """One configuration once: start its tracer, load nginx, read what it cost."""
    run = Run(config=cfg.name, round=rnd, position=pos)
    run.load1 = loadavg()[0]
    run.foreign = foreign_processes(bench.children.pids())
    bench.nginx.check()
    tracer: subprocess.Popen[bytes] | None = None
    out = bench.workdir / f"{cfg.name}-r{rnd}.out"
    err = bench.workdir / f"{cfg.name}-r{rnd}.err"
    try:
        if cfg.kind != "none":
            with open(out, "wb") as fo, open(err, "wb") as fe:
                tracer = bench.children.spawn(cfg.name, cfg.argv, stdout=fo, stderr=fe,
                                              env=cfg.env, cwd=str(bench.workdir))
            run.ready_s = _wait_ready(cfg, tracer, out, err, bench.args.ready_timeout)
        res, before, after = _under_load(bench, run, cfg, tracer)
        _record_load(run, res, before, after)
        if tracer is not None:
            if tracer.poll() is not None:
                raise TracerFailed(f"{cfg.name} died during the load (code {tracer.returncode}); "
                                   f"stderr tail:\n{tail(err)}")
            _record_tracer(run, res, before, after, tracer, bench.args.bpf_stats)
            code = _stop_tracer(bench, run, tracer)
            tracer = None
            _read_outcome(cfg, run, out, err, code)
    finally:
        if tracer is not None:
            bench.children.stop(tracer, signal.SIGTERM, timeout=5)
        if cfg.kind == "bcc" and not bench.args.keep_output:
            out.unlink(missing_ok=True)  # tcpstates writes ~100 bytes per transition
    return run


# --------------------------------------------------------------------------------------------
# The incident variant (--incident)
# --------------------------------------------------------------------------------------------
def _incident_roles(leaks: int) -> list[Role]:
    """Listeners of their own and their clients, done once the leaks are in place: `leaks`
    connections closed by their client in the queue of a listener that never accepts, and
    `leaks` accepted by a server that keeps them after the client shut them down."""
    from bench.load import Role

    roles: list[Role] = []
    try:
        backlog = str(leaks + 128)
        listen = Role(["listen", "--backlog", backlog]).start()
        roles.append(listen)
        server = Role(["server", "--mode", "echo-close", "--backlog", backlog]).start()
        roles.append(server)
        clients = [
            Role(["connect-close", "--port", str(listen.port), "--count", str(leaks)]).start(),
            Role(["churn", "--port", str(server.port), "--count", str(leaks),
                  "--mode", "client-first", "--leak-every", "1"]).start(),
        ]
        roles.extend(clients)
        for c in clients:
            c.wait_done(120)
    except BaseException:
        for r in roles:
            r.stop()
        raise
    return roles


def _wait_more_progs(pid: int, than: int, timeout: float) -> float | None:
    """Seconds until the process holds more BPF programs than `than` (closewait-trace's accept
    watch attaching), or None after the timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _bpf_prog_fds(pid) > than:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


@contextlib.contextmanager
def incident(bench: Bench, run: Run, cfg: Config,
             tracer: subprocess.Popen[bytes] | None) -> Iterator[None]:
    """With --incident, the leaks are open while the block runs (made fresh for each run, after
    the tracer is ready, so that it sees them happen); closewait-trace is first given up to
    --incident-wait seconds to turn its accept watch on (more BPF programs: it may already be
    on at ready when other never-accepted sockets exist on the machine)."""
    if not bench.args.incident:
        yield
        return
    progs = _bpf_prog_fds(tracer.pid) if tracer is not None else 0
    t0 = time.monotonic()
    roles = _incident_roles(bench.args.incident_leaks)
    try:
        run.incident_setup_s = time.monotonic() - t0
        if tracer is not None and cfg.kind == "closewait":
            waited = _wait_more_progs(tracer.pid, progs, bench.args.incident_wait)
            run.notes.append(
                f"{progs} BPF programs at ready; more {waited:.1f} s after the leaks were made"
                if waited is not None else f"{progs} BPF programs at ready, no more within "
                f"{bench.args.incident_wait:g} s after the leaks were made")
        time.sleep(bench.args.incident_settle)
        yield
    finally:
        for r in roles:
            r.stop()


# --------------------------------------------------------------------------------------------
# Start-up from a cold cache
# --------------------------------------------------------------------------------------------
HEADER_CACHE = Path("/var/cache/closewait-trace")


def cold_argv(cfg: Config) -> list[str]:
    """The configuration's command with nothing of ours cached: closewait-trace runs in a
    mount namespace of its own where its header cache is an empty tmpfs (the machine's cache is
    left alone: other tracers may be using it). BCC 0.26 keeps no cache; bench.floor and the
    BCC tools have none either."""
    if cfg.kind != "closewait" or not shutil.which("unshare"):
        return cfg.argv
    script = ('mkdir -p "$1" && mount -t tmpfs closewait-cold "$1" && shift && exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "cold",
            str(HEADER_CACHE), *cfg.argv]


def cold_starts(bench: Bench, configs: list[Config]) -> dict[str, float]:
    """Seconds from exec to ready of one cold start of each tracer configuration, no load."""
    out: dict[str, float] = {}
    for cfg in configs:
        if cfg.kind == "none":
            continue
        log(f"cold start: {cfg.name}")
        cold = Config(cfg.name, cfg.kind, cold_argv(cfg), cfg.env)
        path = bench.workdir / f"{cfg.name}-cold"
        with open(f"{path}.out", "wb") as fo, open(f"{path}.err", "wb") as fe:
            p = bench.children.spawn(cfg.name, cold.argv, stdout=fo, stderr=fe, env=cfg.env,
                                     cwd=str(bench.workdir))
        try:
            out[cfg.name] = _wait_ready(cold, p, Path(f"{path}.out"), Path(f"{path}.err"),
                                        bench.args.ready_timeout)
        except TracerFailed as exc:
            log(f"cold start of {cfg.name} failed: {str(exc).splitlines()[0]}")
        finally:
            bench.children.stop(p, signal.SIGTERM, timeout=bench.args.stop_timeout)
        time.sleep(bench.args.settle)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _med(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:+.{digits}f}%"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _int(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def _paired(runs: list[Run], rs: list[Run]) -> list[float]:
    by_round_none = {r.round: r.conn_s for r in runs if r.config == "none" and r.conn_s}
    return [100 * (r.conn_s / by_round_none[r.round] - 1)
            for r in rs if r.conn_s and by_round_none.get(r.round)]


def summarize(configs: list[Config], runs: list[Run],
              cold: dict[str, float] | None = None) -> list[dict[str, Any]]:
    none_med = _med([r.conn_s for r in runs if r.config == "none"])
    rows = []
    for cfg in configs:
        rs = [r for r in runs if r.config == cfg.name and r.error is None and r.conn_s]
        med = _med([r.conn_s for r in rs])
        lost = [r.events_lost for r in rs if r.events_lost is not None]
        ready = [r.ready_s for r in rs if r.ready_s is not None]
        rows.append({
            "config": cfg.name,
            "command": cfg.command,
            "rounds": len(rs),
            "conn_s": med,
            "conn_s_min": min((r.conn_s for r in rs if r.conn_s), default=None),
            "conn_s_max": max((r.conn_s for r in rs if r.conn_s), default=None),
            "vs_none_pct": (100 * (med / none_med - 1)) if (med and none_med) else None,
            "paired_vs_none_pct": _med(_paired(runs, rs)) if cfg.name != "none" else None,
            "tracer_cpu_pct": _med([r.tracer_cpu_pct for r in rs]),
            "bpf_cpu_pct": _med([r.bpf_cpu_pct for r in rs]),
            "bpf_runs_per_s": _med([r.bpf_runs_per_s for r in rs]),
            "bpf_ns_per_conn": _med([r.bpf_ns_per_conn for r in rs]),
            "tracer_rss_mb": max((r.tracer_rss_mb for r in rs if r.tracer_rss_mb), default=None),
            "tracer_rss_steady_mb": _med([r.tracer_rss_steady_mb for r in rs]),
            "ready_cold_s": (cold or {}).get(cfg.name),
            "ready_warm_s": _med(ready),
            "events_lost_total": sum(lost) if lost else None,
            "events_lost_max": max(lost) if lost else None,
            "machine_busy_pct": _med([r.machine_busy_pct for r in rs]),
            "nginx_cpu_pct": _med([r.nginx_cpu_pct for r in rs]),
            "failed": [r.error for r in runs if r.config == cfg.name and r.error],
        })
    return rows


def _table(columns: Sequence[tuple[str, str]], body: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table; columns are (header, "l" or "r")."""
    out = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for _, a in columns) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return out + [""]


def _header(meta: dict[str, Any]) -> list[str]:
    title = "closewait-trace overhead benchmark"
    if meta.get("interrupted"):
        title += " (INTERRUPTED: partial results)"
    waited = meta.get("waited_s") or 0.0
    lines = [
        f"# {title}\n",
        f"- Date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min"
        + (f" (after waiting {waited / 60:.1f} min for a quiet machine)" if waited else ""),
        f"- Machine: {meta['host']}, kernel {meta['kernel']}, {NCPU} CPU(s) "
        f"({meta['cpu_model']}), {meta['mem_gb']:.0f} GB",
        f"- Command: `{meta['command']}`",
        f"- Server: nginx {meta['nginx']} on 127.0.0.1:{meta['port']} (1 worker, "
        "access_log off, `return 200 \"ok\"`); generated config, own temp dir",
        f"- Load: `{meta['wrk_cmd']}`: every request is a new TCP connection, so "
        "requests/s = connections/s",
        f"- {meta['rounds']} round(s) of {meta['duration']:g} s per configuration; the order "
        f"rotates each round; {meta['settle']:g} s pause between runs; one "
        f"{meta['warmup']:g} s warm-up run (not counted)",
        f"- Load average (1/5/15 min): {meta['load_before']} before, "
        f"{meta['load_after']} after",
    ]
    if meta.get("incident"):
        lines.append(f"- Incident: during every run's load, {meta['incident']:,} never-accepted "
                     f"and {meta['incident']:,} accepted-not-closed sockets in CLOSE_WAIT on "
                     "two other listeners (made after the tracer was ready, closed after the "
                     "load)")
        if meta.get("incident_settle_s"):
            lines.append(f"- The load began {meta['incident_settle_s']:g} s after the leaks "
                         "were made (and closewait-trace's accept watch first attached)")
    return [*lines, ""]


_RESULT_NOTE = (
    "conn/s: median (min–max) of wrk's Requests/sec. vs none: median of the config / median of "
    "`none` - 1. paired vs none: median over rounds of (run / `none` run of the same round - "
    "1), less sensitive to drift. Tracer CPU: utime+stime of the tracer process and its "
    "children during the load / load wall time (100 = one core). BPF ns/conn (--bpf-stats): "
    "run time of the tracer's BPF programs during the load / connections served. Events lost: "
    "closewait-trace's own count (`events_lost` of its summary record), summed over rounds; "
    "for the BCC tools the 'Possibly lost N samples' lines of their stderr.")


def _results(rows: list[dict[str, Any]]) -> list[str]:
    body = []
    for row in rows:
        conn = _num(row["conn_s"], ",.0f")
        if row["conn_s_min"] is not None and row["rounds"] > 1:
            conn += f" ({row['conn_s_min']:,.0f}–{row['conn_s_max']:,.0f})"
        lost = _int(row["events_lost_total"])
        if row["events_lost_total"] is not None and row["rounds"] > 1:
            lost += f" (max {row['events_lost_max']:,}/run)"
        body.append([row["config"], conn,
                     _pct(row["vs_none_pct"]) if row["config"] != "none" else "(baseline)",
                     _pct(row["paired_vs_none_pct"]), _num(row["bpf_ns_per_conn"], ",.0f"),
                     _num(row["tracer_cpu_pct"], ".1f"), lost, str(row["rounds"])])
    cols = [("config", "l"), ("conn/s", "r"), ("vs none", "r"), ("paired vs none", "r"),
            ("BPF ns/conn", "r"), ("tracer CPU (% of 1 core)", "r"), ("events lost", "r"),
            ("rounds", "r")]
    return ["## Results (medians over rounds)\n", *_table(cols, body), _RESULT_NOTE, ""]


def _bpf(rows: list[dict[str, Any]]) -> list[str]:
    measured = [row for row in rows if row["bpf_cpu_pct"] is not None]
    if not measured:
        return []
    body = [[row["config"], f"{row['bpf_cpu_pct']:.2f}", f"{row['bpf_runs_per_s']:,.0f}",
             _num(row["bpf_ns_per_conn"], ",.0f"),
             _num(1e9 * row["bpf_cpu_pct"] / 100 / row["bpf_runs_per_s"], ",.0f")
             if row["bpf_runs_per_s"] else "–"] for row in measured]
    cols = [("config", "l"), ("BPF time (% of 1 core)", "r"), ("BPF program runs/s", "r"),
            ("BPF ns/conn", "r"), ("BPF ns/run", "r")]
    return ["Time inside each tracer's BPF programs (kernel.bpf_stats_enabled; it runs in the "
            "context of nginx, wrk and softirqs, so it is *not* in the tracer CPU column; the "
            "syscall-tracepoint slow path is not in it either):\n", *_table(cols, body)]


def _startup(rows: list[dict[str, Any]]) -> list[str]:
    started = [row for row in rows if row["ready_warm_s"] is not None]
    if not started:
        return []
    body = [[row["config"], _num(row["ready_cold_s"], ".1f"), _num(row["ready_warm_s"], ".1f"),
             _num(row["tracer_rss_mb"], ".0f"), _num(row["tracer_rss_steady_mb"], ".0f")]
            for row in started]
    cols = [("config", "l"), ("exec → ready, cold (s)", "r"),
            ("exec → ready, warm (median of the runs, s)", "r"), ("peak RSS (MB)", "r"),
            ("steady RSS at end of load (median, MB)", "r")]
    return ["## Start-up and memory\n", *_table(cols, body),
            "exec → ready: from spawning the tracer until it is attached (closewait-trace and "
            "bench.floor: their `ready` record; BCC tools: their perf buffer fds open and "
            "stable for 1 s, which adds up to 1 s). Cold: one start before the rounds, with no "
            "load, closewait-trace with an empty header cache (an empty tmpfs over "
            f"{HEADER_CACHE} in a mount namespace of its own, so it merges its headers again); "
            "BCC 0.26 keeps no compile cache, so every start compiles its program again; the OS "
            "page cache is not dropped (the machine is shared). Warm: the starts of the "
            "measured runs. Peak RSS: VmHWM of the tracer and its children just before SIGTERM "
            "(max over rounds); steady RSS: their VmRSS at the same time.",
            ""]


def _commands_and_target(configs: list[Config], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["Commands:\n", *(f"- {cfg.name}: `{cfg.command}`" for cfg in configs)]
    cw = next((r for r in rows if r["config"] == "closewait"), None)
    if cw and cw["conn_s"] is not None:
        slow = cw["paired_vs_none_pct"] if cw["paired_vs_none_pct"] is not None \
            else cw["vs_none_pct"]
        ok_slow = slow is not None and slow >= -TARGET_SLOWDOWN_PCT
        ok_cpu = cw["tracer_cpu_pct"] is not None and cw["tracer_cpu_pct"] < TARGET_CPU_PCT
        lines += ["", f"Target for closewait-trace (within {TARGET_SLOWDOWN_PCT:g}% of no "
                  f"tracer, under {TARGET_CPU_PCT:g}% of a core): throughput {_pct(slow)} "
                  f"{'met' if ok_slow else 'NOT met'}; CPU "
                  f"{_num(cw['tracer_cpu_pct'], '.1f')}% {'met' if ok_cpu else 'NOT met'}."]
    return [*lines, ""]


def _run_notes(r: Run) -> str:
    parts = ([f"FAILED: {r.error.splitlines()[0]}"] if r.error else []) + list(r.notes)
    if r.events_printed is not None:
        parts.append(f"{r.events_printed:,} lines printed")
    if r.bpf_cpu_pct is not None:
        parts.append(f"BPF {r.bpf_cpu_pct:.2f}% ({r.bpf_runs_per_s:,.0f} runs/s)")
    if r.lost_detail and r.events_lost:
        parts.append(f"lost: { {k: v for k, v in r.lost_detail.items() if v} }")
    return "; ".join(parts)


# The per-run table: header, then the Run field and its format ("," alone: an integer with
# thousands separators; a callable: the cell itself).
_RUN_COLUMNS: tuple[tuple[str, str | Callable[[Run], str], str], ...] = (
    ("round", "round", "d"), ("#", "position", "d"), ("config", "config", "s"),
    ("conn/s", "conn_s", ",.0f"), ("tracer CPU %", "tracer_cpu_pct", ".1f"),
    ("BPF ns/conn", "bpf_ns_per_conn", ",.0f"), ("peak RSS MB", "tracer_rss_mb", ".0f"),
    ("steady RSS MB", "tracer_rss_steady_mb", ".0f"), ("BPF progs", "tracer_bpf_progs", ","),
    ("events lost", "events_lost", ","), ("ready (s)", "ready_s", ".1f"),
    ("stop (s)", "stop_s", ".1f"), ("CW seen", "cw_entered", ","),
    ("backend", lambda r: r.backend or "–", ""), ("accepts seen", "accepts_seen", ","),
    ("accepts unmatched", "accepts_unmatched", ","),
    ("machine busy %", "machine_busy_pct", ".0f"), ("steal %", "steal_pct", ".1f"),
    ("nginx CPU %", "nginx_cpu_pct", ".0f"), ("wrk CPU %", "wrk_cpu_pct", ".0f"),
    ("load1", "load1", ".2f"), ("others", lambda r: _others(r.foreign), ""),
    ("notes", _run_notes, ""),
)


def _cell(r: Run, field_: str | Callable[[Run], str], fmt: str) -> str:
    if callable(field_):
        return field_(r)
    value = getattr(r, field_)
    return "–" if value is None else format(value, fmt)


def _per_run(runs: list[Run]) -> list[str]:
    cols = [(h, "l" if fmt in ("s", "") and h != "others" else "r")
            for h, _, fmt in _RUN_COLUMNS]
    body = [[_cell(r, f, fmt) for _, f, fmt in _RUN_COLUMNS] for r in runs]
    return ["## Per-run raw numbers\n", *_table(cols, body),
            "ready: seconds from start until the tracer was attached. stop: seconds from "
            "SIGTERM to exit. BPF progs: BPF programs the tracer held when the load started "
            "(closewait-trace's accept watch adds its syscall programs). CW seen: "
            "closewait-trace's `cw_entered` (sockets that entered CLOSE_WAIT: the client side "
            "of a connection when nginx's FIN arrives before wrk closes). backend, accepts seen / "
            "unmatched: closewait-trace's summary record (`backend`, `accepts_seen`, "
            "`accepts_unmatched`: the accepts its kernel side saw, and those it could not tie to "
            "a socket). machine busy / steal: "
            "all CPUs, from /proc/stat during the load. load1: 1-min load average when the run "
            "started. others: other processes holding BPF programs (bpf) and VMs (vm) when the "
            "run started."]


def _notes(runs: list[Run], notes: list[str]) -> list[str]:
    all_notes = list(notes)
    seen: dict[str, str] = {}
    for r in runs:
        for f in r.foreign:
            seen.setdefault(f.split()[0], f)
    bpf_holders = [f for f in seen.values() if "BPF progs]" in f]
    others = [f for f in seen.values() if "BPF progs]" not in f]
    if bpf_holders:
        all_notes.append(f"{len(bpf_holders)} other process(es) holding BPF programs (other "
                         "tracers: their probes run on every connection here, in the `none` "
                         "baseline too) during some runs: " + "; ".join(bpf_holders[:10])
                         + (" ..." if len(bpf_holders) > 10 else ""))
    if others:
        all_notes.append(f"{len(others)} other tracer-related process(es) or VM(s) during some "
                         "runs: " + "; ".join(others[:6]) + (" ..." if len(others) > 6 else ""))
    if not all_notes:
        return []
    return ["", "## Notes\n", *(f"- {n}" for n in all_notes)]


def render_report(meta: dict[str, Any], configs: list[Config], runs: list[Run],
                  rows: list[dict[str, Any]], notes: list[str]) -> str:
    sections = [_header(meta), _results(rows), _bpf(rows), _startup(rows),
                _commands_and_target(configs, rows), _per_run(runs), _notes(runs, notes)]
    return "\n".join(line for section in sections for line in section) + "\n"


def _others(foreign: list[str]) -> str:
    bpf = sum(1 for f in foreign if "BPF progs]" in f)
    vms = sum(1 for f in foreign if "qemu-system" in f)
    parts = ([f"{bpf} bpf"] if bpf else []) + ([f"{vms} vm"] if vms else [])
    return ", ".join(parts) or "0"


def default_output(quick: bool) -> Path:
    stem = f"overhead-{dt.date.today().isoformat()}" + ("-quick" if quick else "")
    path = RESULTS_DIR / f"{stem}.md"
    i = 2
    while path.exists():
        path = RESULTS_DIR / f"{stem}-{i}.md"
        i += 1
    return path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description="Connections/s of nginx under wrk (Connection: close) with no tracer, "
                    "closewait-trace, and BCC's tcpstates/tcplife; tracer CPU, RSS, lost events.")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--duration", type=float, default=10.0, help="load seconds per run (default 10)")
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s (CI: proves it still works)")
    ap.add_argument("--only", metavar="CONFIG,...",
                    help=f"run only these configurations, from {','.join(ALL_CONFIGS)} "
                         f"(default: {','.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--output", "-o", type=Path,
                    help="report path (default bench/results/overhead-<date>.md; raw numbers "
                         "go to the same name with .json)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="pause between runs, seconds (default 2)")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up load, seconds (default 3)")
    ap.add_argument("--ready-timeout", type=float, default=180.0,
                    help="seconds a tracer may take to attach (default 180)")
    ap.add_argument("--stop-timeout", type=float, default=60.0,
                    help="seconds a tracer may take to exit after SIGTERM (default 60)")
    ap.add_argument("--closewait-trace", metavar="PATH",
                    help="closewait-trace executable (default .venv/bin/closewait-trace)")
    ap.add_argument("--closewait-arg", action="append", default=[], metavar="ARG",
                    help="one more argument at the end of every closewait-trace command line "
                         "(repeatable; with '=' when ARG starts with a dash: --closewait-arg=--backend=kprobe)")
    ap.add_argument("--kernel-headers", metavar="DIR",
                    help="BCC_KERNEL_SOURCE for tcpstates/tcplife (default: found as "
                         "closewait-trace finds its headers)")
    _add_machine_options(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
    if args.rounds < 1 or args.duration <= 0 or args.incident_leaks < 1:
        ap.error("--rounds and --incident-leaks must be >= 1 and --duration > 0")
    return args


def _add_machine_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--incident", action="store_true",
                    help="during every run's load, keep --incident-leaks never-accepted and as "
                         "many accepted-not-closed sockets in CLOSE_WAIT on other ports")
    ap.add_argument("--incident-leaks", type=int, default=1000,
                    help="leaks of each kind for --incident (default 1000)")
    ap.add_argument("--incident-wait", type=float, default=10.0,
                    help="--incident: seconds closewait-trace is given to turn its accept "
                         "watch on before the load (default 10)")
    ap.add_argument("--incident-settle", type=float, default=0.0,
                    help="--incident: seconds more before the load, every configuration (35: "
                         "closewait-trace's accept watch is sampled by then; default 0)")
    ap.add_argument("--wait-quiet", type=float, metavar="LOAD",
                    help="first wait until the 1-min load average is at most LOAD (poll every "
                         "60 s, up to --wait-max)")
    ap.add_argument("--wait-max", type=float, default=1200.0,
                    help="longest wait for --wait-quiet, seconds (default 1200)")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="set kernel.bpf_stats_enabled=1 during the runs (restored after) and "
                         "report the time spent in each tracer's BPF programs; this adds a "
                         "little cost to every program run")
    ap.add_argument("--no-cold-start", action="store_true",
                    help="skip the cold start of each tracer before the rounds")
    ap.add_argument("--tune", action="store_true",
                    help="only sweep wrk threads x connections with no tracer and print conn/s")
    ap.add_argument("--keep-output", action="store_true",
                    help="keep the BCC tools' output files (in the temp dir, which is kept too)")


def wait_quiet(max_load: float, max_wait: float) -> None:
    t0 = time.monotonic()
    while True:
        la = loadavg()
        if la[0] <= max_load:
            log(f"load average {fmt_load(la)}: quiet enough (<= {max_load:g})")
            return
        if time.monotonic() - t0 >= max_wait:
            log(f"load average still {fmt_load(la)} after {max_wait / 60:.0f} min: running anyway")
            return
        log(f"load average {fmt_load(la)} > {max_load:g}: waiting 60 s")
        time.sleep(60)


def tune(args: argparse.Namespace, children: Children, nginx: Nginx, workdir: Path) -> None:
    combos = [(1, 8), (1, 16), (1, 32), (1, 64), (1, 128), (2, 16), (2, 32), (2, 64)]
    dur = args.duration if not args.quick else 3.0
    print(f"| wrk | conn/s (2 runs of {dur:g} s) | nginx CPU % | wrk CPU % |")
    print("|---|---:|---:|---:|")
    for t, c in combos:
        vals, ngs, wks = [], [], []
        for _ in range(2):
            ng0 = tree_cpu_s(nginx.proc.pid) if nginx.proc else 0.0
            res = run_wrk(children, wrk_argv(args.wrk_bin, t, c, dur, nginx.url), workdir)
            ng1 = tree_cpu_s(nginx.proc.pid) if nginx.proc else 0.0
            vals.append(res.rps)
            ngs.append(100 * (ng1 - ng0) / res.seconds)
            wks.append(100 * res.cpu_s / res.seconds)
            time.sleep(args.settle)
        print(f"| -t{t} -c{c} | {' / '.join(f'{v:,.0f}' for v in vals)} | "
              f"{statistics.mean(ngs):.0f} | {statistics.mean(wks):.0f} |", flush=True)


class BpfStats:
    """kernel.bpf_stats_enabled=1 while the benchmark runs, the old value restored after."""

    PATH = Path("/proc/sys/kernel/bpf_stats_enabled")

    def __init__(self) -> None:
        self.old: str | None = None

    def enable(self) -> None:
        self.old = self.PATH.read_text().strip()
        self.PATH.write_text("1\n")

    def restore(self) -> None:
        if self.old is not None:
            self.PATH.write_text(self.old + "\n")
            self.old = None


def _look_around(args: argparse.Namespace) -> float:
    """Wait for a quiet machine if asked (returns the seconds waited); warn about tracers."""
    waited = 0.0
    if args.wait_quiet is not None:
        t_wait = time.monotonic()
        wait_quiet(args.wait_quiet, args.wait_max)
        waited = time.monotonic() - t_wait
    foreign = foreign_processes(set())
    if foreign:
        log("WARNING: other tracers/VMs are running and will skew the numbers: "
            + "; ".join(foreign[:5]))
    return waited


def _warm_up(bench: Bench) -> None:
    args = bench.args
    if args.warmup > 0:
        log(f"warm-up: {args.warmup:g} s of load, not counted")
        run_wrk(bench.children, wrk_argv(args.wrk_bin, args.threads, args.connections,
                                         args.warmup, bench.nginx.url), bench.workdir)
        time.sleep(args.settle)


def _meta(args: argparse.Namespace, argv: Sequence[str] | None, nginx: Nginx,
          load_before: tuple[float, float, float], waited: float) -> dict[str, Any]:
    wrk_cmd = " ".join(shlex.quote(a) for a in wrk_argv(
        "wrk", args.threads, args.connections, args.duration, nginx.url))
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(),
        "cpu_model": _cpu_model(), "mem_gb": _mem_gb(),
        "command": _command_line(argv), "nginx": nginx.version, "port": nginx.port,
        "wrk_cmd": wrk_cmd, "rounds": args.rounds, "duration": args.duration,
        "settle": args.settle, "warmup": args.warmup, "threads": args.threads,
        "connections": args.connections, "load_before": fmt_load(load_before),
        "waited_s": waited, "incident": args.incident_leaks if args.incident else 0,
        "incident_settle_s": args.incident_settle if args.incident else 0,
        "closewait_args": list(args.closewait_arg),
    }


def _failed_run(cfg: Config, rnd: int, pos: int, exc: TracerFailed, notes: list[str]) -> Run:
    msg = str(exc)
    log(f"ERROR: {msg}")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    errs = [ln for ln in lines[1:] if re.search(r"error|Error|Exception", ln)]
    short = " / ".join([lines[0], *(errs[:2] or lines[1:4])])
    notes.append(f"{cfg.name} failed in round {rnd} and was dropped from the remaining rounds: "
                 f"{short[:400]}")
    return Run(config=cfg.name, round=rnd, position=pos, error=msg)


def _log_run(run: Run) -> None:
    if run.error is not None:
        return
    extra = ""
    if run.tracer_cpu_pct is not None:
        extra = (f", tracer {run.tracer_cpu_pct:.1f}% CPU, {_num(run.tracer_rss_mb, '.0f')} MB, "
                 f"lost {run.events_lost if run.events_lost is not None else '?'}")
    if run.bpf_ns_per_conn is not None:
        extra += f", BPF {run.bpf_ns_per_conn:,.0f} ns/conn"
    log(f"  {run.conn_s:,.0f} conn/s{extra}")


def run_rounds(bench: Bench, configs: list[Config], runs: list[Run], notes: list[str]) -> None:
    """Every configuration once per round, the order rotated by one each round; a
    configuration that fails is dropped from the later rounds. Appends to `runs` as it goes
    (an interruption keeps what was measured)."""
    n, rounds = len(configs), bench.args.rounds
    failed: set[str] = set()
    for rnd in range(1, rounds + 1):
        k = (rnd - 1) % n
        for pos, cfg in enumerate(configs[k:] + configs[:k], 1):
            if cfg.name in failed:
                continue
            log(f"round {rnd}/{rounds} run {pos}/{n} "
                f"({(rnd - 1) * n + pos}/{rounds * n}): {cfg.name}")
            try:
                run = run_one(cfg, rnd, pos, bench)
            except TracerFailed as exc:
                failed.add(cfg.name)
                run = _failed_run(cfg, rnd, pos, exc, notes)
            runs.append(run)
            _log_run(run)
            time.sleep(bench.args.settle)


def write_results(args: argparse.Namespace, meta: dict[str, Any], configs: list[Config],
                  runs: list[Run], notes: list[str]) -> None:
    rows = summarize(configs, runs, meta.get("cold_start_s"))
    report = render_report(meta, configs, runs, rows, notes)
    out = args.output or default_output(args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "configs": [asdict(c) | {"env": None} for c in configs],
         "summary": rows, "runs": [asdict(r) for r in runs],
         "notes": notes}, indent=1) + "\n")
    print(report)
    log(f"report written to {out} (raw numbers: {out.with_suffix('.json')}); "
        f"wall time {meta['wall_s'] / 60:.1f} min")


def _clean_up(children: Children, stats: BpfStats, workdir: Path, keep: bool) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    children.stop_all()
    stats.restore()
    for sig in SIGNALS:
        signal.signal(sig, _raise_interrupt)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(args: argparse.Namespace, argv: Sequence[str] | None, bench: Bench,
             configs: list[Config], runs: list[Run], notes: list[str],
             stats: BpfStats, meta: dict[str, Any]) -> None:
    """Everything between the checks and the report; fills `meta` before the rounds."""
    waited = _look_around(args)
    started = time.monotonic()
    load_before = loadavg()
    if args.bpf_stats:
        stats.enable()
        notes.append("--bpf-stats: kernel.bpf_stats_enabled was 1 during the runs (it times "
                     "every BPF program run, which costs a little)")
    bench.nginx.start()
    log(f"nginx {bench.nginx.version} on {bench.nginx.url} (temp dir {bench.workdir})")
    if args.tune:
        tune(args, bench.children, bench.nginx, bench.workdir)
        return
    _warm_up(bench)
    meta.update(_meta(args, argv, bench.nginx, load_before, waited), started=started)
    if not args.no_cold_start:
        meta["cold_start_s"] = cold_starts(bench, configs)
    run_rounds(bench, configs, runs, notes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    notes: list[str] = []
    children = Children()
    for sig in SIGNALS:
        signal.signal(sig, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="closewait-bench-"))
    runs: list[Run] = []
    configs: list[Config] = []
    meta: dict[str, Any] = {}
    interrupted = False
    stats = BpfStats()
    try:
        if args.tune:
            args.only = "none"
        configs = build_configs(args, notes)
        if any(c.kind != "none" for c in configs) and os.geteuid() != 0:
            raise BenchError("tracers need root: sudo .venv/bin/python -m bench.overhead ...")
        bench = Bench(args, children, Nginx(args.nginx_bin, children, workdir), workdir)
        _measure(args, argv, bench, configs, runs, notes, stats, meta)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping child processes")
    except BenchError as exc:
        children.stop_all()
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _clean_up(children, stats, workdir, args.keep_output)
    if not runs or not meta:
        return 130 if interrupted else (0 if args.tune else 1)
    t_start = meta.pop("started", t_start)
    meta.update(load_after=fmt_load(loadavg()), wall_s=time.monotonic() - t_start,
                interrupted=interrupted)
    write_results(args, meta, configs, runs, notes)
    if interrupted:
        return 130
    return 1 if any(r.error for r in runs) else 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_gb() -> float:
    kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    return kb / 1024 / 1024


def _command_line(argv: Sequence[str] | None) -> str:
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python -m bench.overhead", *(shlex.quote(a) for a in args)])


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    sys.exit(main())
