"""The benchmarks' socket workloads in the grammar they have always had, run by
closewait_trace.workloads (whose load roles and child supervision they are): real servers and
clients on loopback, each in its own process (the tracer sees owners and peers as different
processes, as in production). Also the sysctls and the main() shared by bench.scale and
bench.soak.

Every role prints `PORT n` (servers), `LEAK local remote` for each connection it leaves in
CLOSE_WAIT on purpose (a leak the tracer must flag), and `DONE n` when a client finished its
`n` connections.

    python -m bench.load server --mode echo-close
    python -m bench.load churn --port P --count 50000 --mode client-first --leak-every 10000
    python -m bench.load listen --backlog 10000            (never accepts)
    python -m bench.load connect-close --port P --count 10000
    python -m bench.load hold --port P --count 10000       (keeps what the server closes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from closewait_trace.workloads import roles
from closewait_trace.workloads.children import Child, DemoError

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    p = sub.add_parser("server")
    p.add_argument("--mode", choices=("echo-close", "close-now"), default="echo-close")
    p.add_argument("--backlog", type=int, default=4096)
    p = sub.add_parser("listen")
    p.add_argument("--backlog", type=int, default=4096)
    p = sub.add_parser("churn")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=("client-first", "server-first"), default="client-first")
    p.add_argument("--leak-every", type=int, default=0)
    for name in ("connect-close", "hold"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count", type=int, required=True)
    return ap


def role_argv(args: Sequence[str]) -> list[str]:
    """The closewait_trace.workloads role (name and arguments) for bench.load arguments."""
    a = _parser().parse_args(list(args))
    if a.role == "server":
        return ["load-server", a.mode, str(a.backlog)]
    if a.role == "listen":
        return ["listen", str(a.backlog)]
    if a.role == "churn":
        return ["churn", str(a.port), str(a.count), a.mode, str(a.leak_every)]
    return ["hold-all" if a.role == "hold" else a.role, str(a.port), str(a.count)]


class Role:
    """One role in a child process, given by its bench.load arguments; its LEAK lines are
    collected as they come."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self._child: Child | None = None

    def start(self) -> Role:
        argv = role_argv(self.args)
        self._child = Child(argv[0], argv)
        if self.args[0] in ("server", "listen"):
            self._child.expect_port()
        return self

    @property
    def child(self) -> Child:
        assert self._child is not None, "the role was not started"
        return self._child

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_done(self, timeout: float) -> None:
        self.child.wait_done(timeout)

    def leaked(self) -> list[tuple[str, str]]:
        return self.child.leaked()

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop()


class Sysctls:
    """Set sysctls for the duration of a `with` block, restoring the old values after."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.old: dict[str, str] = {}

    @staticmethod
    def _path(name: str) -> Path:
        return Path("/proc/sys") / name.replace(".", "/")

    def __enter__(self) -> Sysctls:
        for name, value in self.values.items():
            p = self._path(name)
            self.old[name] = p.read_text().strip()
            p.write_text(value)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self.old.items():
            self._path(name).write_text(value)


#: What 10,000+ sockets queued on one listener need (6.18's default somaxconn is 4096).
SCALE_SYSCTLS = {"net.core.somaxconn": "65535", "net.ipv4.tcp_max_syn_backlog": "65535"}


Result = tuple[dict[str, Any], list[str]]


#: A command's option: flag, type, default, help (the default is added to the help).
Option = tuple[str, type[int] | type[float], float, str]


def status_kb(pid: int, key: str) -> int | None:
    """One figure (kB) of /proc/PID/status, such as VmRSS or VmHWM; None if not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_command(name: str, doc: str | None, options: Sequence[Option],
                argv: Sequence[str] | None, run: Callable[[argparse.Namespace], Result],
                report: Callable[[dict[str, Any], list[str], Sequence[str]], str]) -> int:
    """main() of bench.scale and bench.soak: parse, check root, run, write and print the
    report. Exit codes: 0 every target met, 1 one missed, 2 set-up error."""
    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, text in options:
        ap.add_argument(flag, type=kind, default=kind(default), help=f"{text} (default {default:g})")
    ap.add_argument("--closewait-trace", metavar="PATH",
                    help="the tracer to run (default .venv/bin/closewait-trace)")
    ap.add_argument("-o", "--output", type=Path,
                    help=f"the report (default bench/results/{name}-<date>.md)")
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(args_list)
    if os.geteuid() != 0:
        print(f"bench.{name}: needs root (BPF)", file=sys.stderr)
        return 2
    try:
        res, misses = run(args)
    except (RuntimeError, OSError, DemoError) as exc:
        print(f"bench.{name}: error: {exc}", file=sys.stderr)
        return 2
    text = report(res, misses, args_list)
    out = args.output or (REPO / "bench" / "results" / f"{name}-{dt.date.today().isoformat()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    for miss in misses:
        print(f"bench.{name}: missed: {miss}", file=sys.stderr)
    print(f"report written to {out}", file=sys.stderr)
    return 1 if misses else 0


def find_closewait() -> str:
    venv = REPO / ".venv" / "bin" / "closewait-trace"
    return str(venv) if venv.exists() else "closewait-trace"


def main(argv: Sequence[str] | None = None) -> int:
    return roles.main(role_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
