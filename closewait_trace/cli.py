"""CLI stage: options in, one clear line and an exit code out on any error.

`closewait-trace [OPTIONS]` traces live; `record` traces and records; `report` replays a
recording; `snapshot` looks once without BPF; `doctor` says what will run and why; `demo`
starts a built-in workload and traces it. Every option is declared once below and shared by
the commands that take it; the tracing ones become one typed `Options` (options.py).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from . import __version__
from .facts.containers import select_containers
from .errors import CloseWaitError, OutputError, PrivilegeError, UsageError
from .kernel.headers import HeaderCandidate
from .facts.netns import resolve_netns
from .options import BACKEND_NAMES, DEFAULT_MAX_CW, DEFAULT_MAX_SOCKS, DEFAULT_REPORT_MIN_NS, \
    DEFAULT_THRESHOLD_NS, AcceptWatch, Options, TimelineMode
from .outputs.render import JsonRenderer, LiveRenderer, PlainRenderer, Renderer
from .outputs.textsafe import visible

if TYPE_CHECKING:
    from .workloads.scenarios import Scenario

F = TypeVar("F", bound=Callable[..., Any])

#: Exit status when whoever reads our output has gone (`closewait-trace --json | head -1`):
#: 128 + SIGPIPE, as if the default SIGPIPE action had ended the process; nothing printed.
EXIT_BROKEN_PIPE = 141
#: The output the user asked for could not be written (stdout on a full disk).
EXIT_OUTPUT = 74

_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
          "h": 3_600_000_000_000}
#: Longest duration any option takes: ten years.
MAX_DURATION_NS = 10 * 365 * 24 * _UNITS["h"]
#: Largest PID Linux allows (PID_MAX_LIMIT on 64-bit).
PID_MAX_LIMIT = 4_194_304


def parse_duration(text: str) -> int:
    """'10s', '500ms', '2m', '1h', '1.5' (seconds) -> nanoseconds."""
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*(ns|us|ms|s|m|h)?\s*", text)
    if not m:
        raise UsageError(f"bad duration {visible(text)!r}: use e.g. 500ms, 10s, 2m")
    try:
        value = Decimal(m.group(1)) * _UNITS[m.group(2) or "s"]
    except InvalidOperation:
        raise UsageError(f"bad duration {text!r}: use e.g. 500ms, 10s, 2m") from None
    if value > MAX_DURATION_NS:
        raise UsageError(f"bad duration {text!r}: longer than ten years")
    if int(value) <= 0:
        raise UsageError(f"bad duration {text!r}: must be greater than zero")
    return int(value)


def duration_text(ns: int) -> str:
    """The text of a duration in its largest whole unit, as parse_duration reads it back
    (10_000_000_000 -> '10s', 200_000_000 -> '200ms')."""
    unit = max((u for u, size in _UNITS.items() if ns % size == 0), key=_UNITS.__getitem__)
    return f"{ns // _UNITS[unit]}{unit}"


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()
_PATH = click.Path(path_type=Path, dir_okay=False)


# --- options, each declared once --------------------------------------------------------------

_PID = click.option("-p", "--pid", "pids", type=click.IntRange(1, PID_MAX_LIMIT), multiple=True,
                    help="Trace only sockets of this process and the processes it starts."
                    " Repeatable.")
_PORT = click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
                     help="Trace only sockets with this local or remote port. Repeatable.")
_CONTAINER = click.option(
    "--container", "containers", metavar="ID-or-NAME", multiple=True,
    help="Only sockets of this container (name, id prefix, pod name, namespace/pod or pod"
    " UID). Repeatable.")
_NETNS = click.option("--netns", "netns", metavar="INODE-or-PATH", multiple=True,
                      help="Only sockets of this network namespace (its inode as `lsns -t"
                      " net` shows it, a path like /proc/PID/ns/net, or an `ip netns`"
                      " name). Repeatable.")
_DURATION = click.option("--duration", type=DURATION, default=None,
                         help="Stop after this long (default: until Ctrl-C, SIGTERM or SIGHUP).")
_THRESHOLD = click.option("--threshold", type=DURATION, default=duration_text(DEFAULT_THRESHOLD_NS),
                          show_default=True,
                          help="Age in CLOSE_WAIT at which a socket is flagged as a leak.")
_REPORT_MIN = click.option("--report-min", type=DURATION,
                           default=duration_text(DEFAULT_REPORT_MIN_NS), show_default=True,
                           help="Stays in CLOSE_WAIT shorter than this are only counted, not"
                           " listed.")
_BACKEND = click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto",
                        show_default=True,
                        help="How accept() and close() are seen; auto picks the best available.")
_HEADERS = click.option("--kernel-headers", type=click.Path(path_type=Path),
                        help="Kernel header tree to compile against (default: found"
                        " automatically).")
_ACCEPT_WATCH = click.option(
    "--accept-watch", type=click.Choice([w.value for w in AcceptWatch]),
    default=AcceptWatch.AUTO.value,
    show_default=True,
    help="Tracepoint backend only: trace accept() through the syscall tracepoints while"
    " never-accepted sockets need explaining, continuously for 30 s then 2 s in every 20 s"
    ", 30 s again when sockets wait on a listener new to a sampled incident, at most once in"
    " 5 min (auto), the whole time they do (while-needed), or always. While attached they"
    " slow every syscall on the machine.")
_MAX_SOCKETS = click.option("--max-sockets", type=click.IntRange(1024, 1 << 22),
                            default=DEFAULT_MAX_SOCKS, show_default=True,
                            help="Size of the kernel's per-socket map.")
_MAX_CW = click.option("--max-close-wait", type=click.IntRange(256, 1 << 22),
                       default=DEFAULT_MAX_CW, show_default=True,
                       help="Size of the kernel's CLOSE_WAIT map; the event ring buffer is"
                       " sized to hold an exit of each of its sockets at once.")
_OWNER_ROOM = click.option(
    "--owner-room", type=click.IntRange(0, 1 << 22), default=None,
    help="Most CLOSE_WAIT map entries one uid may hold, so that one tenant's flood cannot hide"
    " another's leak (over it: counted as lost). Default: three quarters of --max-close-wait;"
    " 0: no limit.")
_JSON = click.option("--json", "as_json", is_flag=True,
                     help="One JSON object per line (docs/json-schema.md).")
_PLAIN = click.option("--plain", is_flag=True, help="Plain lines even on a terminal.")
_TIMELINE = click.option(
    "--timeline", type=click.Choice([m.value for m in TimelineMode]), is_flag=False,
    flag_value=TimelineMode.FLAGGED.value, default=None,
    help="Print the lifecycle timeline of each flagged socket; `--timeline all`: of every socket"
    " matching the filters (the kernel then sends their transitions).")
_EXPORT = click.option("--timeline-export", type=_PATH,
                       help="Also write the timelines shown to this .html or .svg file.")
_METRICS = click.option("--metrics", metavar="[ADDR:]PORT",
                        help="Serve Prometheus metrics on this port (bound to 127.0.0.1 unless"
                        " an address is given).")


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(fn: F) -> F:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn

    return apply


_TRACE_OPTIONS = (_PID, _PORT, _CONTAINER, _NETNS, _DURATION, _THRESHOLD, _REPORT_MIN, _BACKEND,
                  _HEADERS, _ACCEPT_WATCH, _MAX_SOCKETS, _MAX_CW, _OWNER_ROOM, _JSON, _PLAIN,
                  _TIMELINE, _EXPORT, _METRICS)


@dataclass(frozen=True)
class Output:
    """Where and how the session's results go."""

    as_json: bool = False
    plain: bool = False
    timelines: TimelineMode | None = None
    export: Path | None = None
    metrics: str | None = None


def _pop_output(params: dict[str, Any]) -> Output:
    timelines = params.pop("timeline")
    export = params.pop("timeline_export")
    if export is not None and timelines is None:
        timelines = TimelineMode.FLAGGED.value
    return Output(as_json=params.pop("as_json"), plain=params.pop("plain"),
                  timelines=TimelineMode(timelines) if timelines else None, export=export,
                  metrics=params.pop("metrics"))


def _pop_options(params: dict[str, Any], output: Output) -> Options:
    threshold, report_min = params.pop("threshold"), params.pop("report_min")
    if threshold < report_min:
        raise UsageError("--threshold must not be shorter than --report-min")
    duration = params.pop("duration")
    return Options(
        pids=frozenset(params.pop("pids")), ports=frozenset(params.pop("ports")),
        threshold_ns=threshold, report_min_ns=report_min, backend=params.pop("backend"),
        kernel_headers=params.pop("kernel_headers"),
        duration_s=duration / 1e9 if duration else None, max_socks=params.pop("max_sockets"),
        max_cw=params.pop("max_close_wait"), owner_room=params.pop("owner_room"),
        timelines=output.timelines,
        accept_watch=AcceptWatch(params.pop("accept_watch")),
        containers=_containers(params.pop("containers")),
        netns=frozenset(resolve_netns(n) for n in params.pop("netns")),
    )


def _containers(queries: tuple[str, ...]) -> tuple[str, ...]:
    """--container values, each checked to name a running container (UsageError)."""
    for query in queries:
        select_containers(query)
    return tuple(q.strip() for q in queries)


def tracing_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command every tracing option; it receives them as `options` and `output`."""

    @functools.wraps(fn)
    def run(*args: Any, **params: Any) -> None:
        with edge():
            output = _pop_output(params)
            options = _pop_options(params, output)
            fn(*args, options=options, output=output, **params)

    return _options(*_TRACE_OPTIONS)(run)


# --- the edge: one line and an exit status --------------------------------------------------


#: Errors of writing to an output (standard output on a full disk, a dead terminal).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class edge:
    """Library errors become one line on stderr and the error's exit code; a reader that
    went away (broken pipe) ends the program quietly with EXIT_BROKEN_PIPE."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 _tb: object) -> None:
        if isinstance(exc, CloseWaitError):
            fail(str(exc), exc.exit_code)
        if isinstance(exc, BrokenPipeError):
            _quiet_exit(EXIT_BROKEN_PIPE)
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS and exc.filename is None:
            fail(f"cannot write the output: {exc.strerror or exc}", EXIT_OUTPUT)


def fail(message: str, status: int) -> None:
    click.echo(f"closewait-trace: error: {visible(message)}", err=True)
    sys.exit(status)


def _quiet_exit(status: int) -> None:
    """Exit now without flushing stdout again (its reader is gone); cleanup already ran on
    the way here (the World and probes close in `finally` blocks)."""
    try:
        sys.stderr.flush()
    finally:
        os._exit(status)


# --- running a session ----------------------------------------------------------------------


def _json_stream() -> IO[str]:
    """Standard output for the JSON lines alone: the stream gets its own descriptor and fd 1
    becomes stderr, so whatever BCC, its compiler or the kernel prints can never land in the
    JSON stream. Block-buffered: JsonRenderer flushes after each record outside a tick and
    once after a tick's records (line buffering made a write(2) of every record)."""
    try:
        if sys.stdout.fileno() != 1:
            return sys.stdout
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return sys.stdout  # not a real descriptor (a test's runner): nothing else writes there
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return stream


def _renderer(output: Output) -> Renderer:
    from .pipeline.timeline import Exporter

    exporter = Exporter(output.export) if output.export is not None else None
    if output.as_json:
        return JsonRenderer(_json_stream(), output.timelines, exporter)
    if output.plain or not sys.stdout.isatty():
        return PlainRenderer(sys.stdout, output.timelines, exporter)
    return LiveRenderer(Console(), output.timelines, exporter)


def _compile_notice(renderer: Renderer) -> tuple[Callable[[HeaderCandidate], None], Callable[[], None]]:
    """A spinner while BCC compiles (terminal only); returns (on_compile, done)."""
    if isinstance(renderer, LiveRenderer):
        status = renderer.console.status("compiling BPF programs")
        started = [False]

        def on_compile(cand: HeaderCandidate) -> None:
            status.update(visible(f"compiling BPF programs against {cand.origin} ({cand.path})"))
            if not started[0]:
                status.start()
                started[0] = True

        return on_compile, status.stop
    return (lambda cand: None), (lambda: None)


def _open_recording(path: Path) -> IO[str]:
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


def _start_metrics(address: str, renderer: Renderer) -> Renderer:
    from .facts import enrich
    from .outputs.metrics import MetricsExporter, TeeRenderer, parse_listen

    host, port = parse_listen(address)
    exporter = MetricsExporter(host, port, listeners=enrich.listeners)
    try:
        exporter.start()
    except OSError as exc:
        raise OutputError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from exc
    renderer.notice(f"Prometheus metrics on http://{host}:{port}/metrics")
    return TeeRenderer(renderer, exporter)


def run_trace(options: Options, output: Output, *, record_to: Path | None = None,
              before_run: Callable[[], None] | None = None,
              stop: threading.Event | None = None, notices: Sequence[str] = ()) -> int:
    """Check every output, attach, trace until stopped, render the summary; optionally
    record to a file. Outputs are checked before the (slow) compile, so a typo fails fast."""
    from .startup import resolve_targets, stop_on_signals, trace

    stop = stop or stop_on_signals()
    renderer = _renderer(output)
    for text in notices:
        renderer.notice(text)
    options = resolve_targets(options, renderer.notice)
    out = _open_recording(record_to) if record_to is not None else None
    try:
        if output.metrics is not None:
            renderer = _start_metrics(output.metrics, renderer)
        on_compile, done = _compile_notice(renderer)
        trace(options, renderer, stop=stop, record=out, before_run=before_run,
              on_compile=on_compile, compiled=done)
    finally:
        if out is not None:
            _close_quietly(out)
    return 0


def _close_quietly(f: IO[str]) -> None:
    try:
        f.close()
    except OSError:
        pass  # a write error already reported by the recording


# --- commands -------------------------------------------------------------------------------


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="closewait-trace")
@tracing_command
@click.pass_context
def main(ctx: click.Context, *, options: Options, output: Output) -> None:
    """Trace TCP sockets in CLOSE_WAIT live: who owns them, whether they were accepted,
    whether they were closed, and why they leak.

    With no command, traces every process (or those given with -p) until stopped.
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[-1] for p in ctx.command.params
                 if p.name and ctx.get_parameter_source(p.name)
                 is not click.core.ParameterSource.DEFAULT]
        if given:
            fail(f"put {given[0]} after the command name ({ctx.invoked_subcommand})", 2)
        return
    with edge():
        sys.exit(run_trace(options, output))


@main.command()
@click.option("-o", "--output", "path", type=_PATH, required=True,
              help="File to write the recording to.")
@tracing_command
def record(path: Path, *, options: Options, output: Output) -> None:
    """Trace live as the main command does, and record the trace to a file that
    `closewait-trace report` reads back on any machine, without root or BPF."""
    with edge():
        sys.exit(run_trace(options, output, record_to=path))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("-p", "--pid", "pids", type=click.IntRange(1, PID_MAX_LIMIT), multiple=True,
              help="Only sockets owned by this process. Repeatable.")
@_PORT
@_CONTAINER
@_NETNS
@click.option("-v", "--verbose", is_flag=True, help="List every socket too.")
def snapshot(as_json: bool, pids: tuple[int, ...], ports: tuple[int, ...],
             containers: tuple[str, ...], netns: tuple[str, ...], verbose: bool) -> None:
    """Show the sockets in CLOSE_WAIT now, grouped by process and listener, with the causes
    a single look can tell (no BPF needed: sock_diag and /proc only)."""
    import json

    from .kernel.features import is_privileged
    from .snapshot import render_lines, take

    with edge():
        privileged, why = is_privileged()
        if not privileged:
            raise PrivilegeError("snapshot needs root to see which process holds each socket"
                                 f" ({why})")
        snap = take(ports=frozenset(ports), pids=frozenset(pids),
                    containers=_containers(containers),
                    netns=frozenset(resolve_netns(n) for n in netns))
        if as_json:
            click.echo(json.dumps(snap.as_dict()))
        else:
            for line in render_lines(snap, verbose):
                click.echo(visible(line))
    sys.exit(0)


@main.command()
@click.argument("file", type=_PATH)
@_JSON
@click.option("--timeline", type=click.Choice([m.value for m in TimelineMode]), is_flag=False,
              flag_value=TimelineMode.FLAGGED.value, default=None,
              help="Timelines to show (default: those the recording was made with).")
@_EXPORT
def report(file: Path, as_json: bool, timeline: str | None, timeline_export: Path | None) -> None:
    """Rebuild the summary, leaks, diagnoses and timelines of a recording (no root needed)."""
    from .outputs.record import RecordFormatError, open_replay
    from .session import Session
    from .world import WorldEnded

    with edge():
        world = open_replay(file)
        header = world.header
        try:
            options = Options.from_dict(header["options"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordFormatError(f"{file}:1: bad options in the header ({exc})") from None
        chosen = TimelineMode(timeline) if timeline else options.timelines
        renderer = _renderer(Output(as_json=as_json, plain=True, timelines=chosen,
                                    export=timeline_export))
        if not as_json:
            renderer.notice(
                f"report of {file}: recorded {header.get('created')} on {header.get('host')}"
                f" (kernel {header.get('kernel')})"
            )
        try:
            session = Session(options, renderer, world, dict(header["info"]),
                              call_order=world.call_order)
        except WorldEnded:
            raise RecordFormatError(world.error or f"{file}: no records") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordFormatError(f"{file}:1: bad start information in the header"
                                    f" ({exc})") from None
        session.start()
        session.run()
        if world.error is not None:
            fail(f"{world.error}; the report above covers everything before it", 65)
    sys.exit(0)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Say which backend will run and why; exit non-zero if tracing is impossible."""
    import json

    from .doctor import doctor_checks

    with edge():
        checks, status = doctor_checks()
    if as_json:
        click.echo(json.dumps({"ok": status == 0, "checks": [
            {"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks]}))
    else:
        for c in checks:
            mark = "ok " if c.ok else ("?  " if c.ok is None else "-- ")
            click.echo(visible(f"{mark} {c.name:<28} {c.detail}"))
        click.echo("tracing is possible" if status == 0 else "tracing is NOT possible here")
    sys.exit(status)


def _scenario_names() -> list[str]:
    from .workloads.scenarios import SCENARIOS

    return list(SCENARIOS)


def _mixed_demo_default(seconds: Callable[[Scenario], float]) -> str:
    """A default of the mixed demo (its duration or threshold), as the demo's help shows it."""
    from .workloads.scenarios import DEFAULT, SCENARIOS

    return duration_text(int(seconds(SCENARIOS[DEFAULT]) * 1e9))


@main.command()
@click.option("--scenario", type=click.Choice(_scenario_names()), default=None,
              help="Which workload to run: one real-world case each (see --list-scenarios);"
              " default: the mixed demo.")
@click.option("--list-scenarios", is_flag=True, help="List the scenarios and exit.")
@click.option("--duration", type=DURATION, default=None,
              help="How long to run the demo.  [default: the scenario's;"
              f" {_mixed_demo_default(lambda s: s.duration_s)} for the mixed demo]")
@click.option("--threshold", type=DURATION, default=None,
              help="Leak threshold for the demo.  [default: the scenario's;"
              f" {_mixed_demo_default(lambda s: s.threshold_s)} for the mixed demo]")
@_options(_BACKEND, _HEADERS, _JSON, _PLAIN)
@click.option("-o", "--record", type=_PATH,
              help="Also record the trace to this file (see `report`).")
@click.option("--timeline", type=click.Choice(["none"] + [m.value for m in TimelineMode]),
              default=TimelineMode.FLAGGED.value, show_default=True,
              help="Which lifecycle timelines to print.")
@_options(_EXPORT, _ACCEPT_WATCH)
def demo(scenario: str | None, list_scenarios: bool, duration: int | None,
         threshold: int | None, backend: str, kernel_headers: Path | None, as_json: bool,
         plain: bool, record: Path | None, timeline: str, timeline_export: Path | None,
         accept_watch: str) -> None:
    """Start a built-in leaky workload in child processes and trace it live.

    A listener that never accepts, a server that accepts and never closes, a healthy server,
    and a client pool whose server closes idle connections. With --scenario, one real-world
    case instead (a process at its open-files limit, a forgotten close(), an edge-triggered
    epoll accept loop, a slow handler, a large backlog, a client pool).
    """
    from .workloads.scenarios import DEFAULT, SCENARIOS, listing

    if list_scenarios:
        for line in listing():
            click.echo(line)
        sys.exit(0)
    chosen = SCENARIOS[scenario or DEFAULT]
    threshold = threshold or int(chosen.threshold_s * 1e9)
    timelines = None if timeline == "none" else TimelineMode(timeline)
    options = Options(threshold_ns=threshold, report_min_ns=min(DEFAULT_REPORT_MIN_NS, threshold),
                      backend=backend, kernel_headers=kernel_headers,
                      duration_s=(duration or int(chosen.duration_s * 1e9)) / 1e9,
                      timelines=timelines, accept_watch=AcceptWatch(accept_watch))
    output = Output(as_json=as_json, plain=plain, timelines=timelines, export=timeline_export)
    with edge():
        _run_demo(scenario, options, output, record)
    sys.exit(0)


def _run_demo(scenario: str | None, options: Options, output: Output,
              record: Path | None) -> None:
    from dataclasses import replace

    from .workloads.scenarios import Workload
    from .workloads.scenarios import DEFAULT, SCENARIOS, ScenarioRun, describe
    from .startup import stop_on_signals

    chosen = SCENARIOS[scenario or DEFAULT]
    stop = stop_on_signals()
    notices = [chosen.notice] if scenario is not None else []
    workload: Workload | ScenarioRun = ScenarioRun(chosen) if chosen.roles else Workload()
    try:
        workload.start_servers()
        if isinstance(workload, Workload):
            notices.append("demo: " + ", ".join(
                f"{n} pid {p} port {workload.ports.get(n, '-')}"
                for n, p in workload.pids().items()))
        else:
            notices.append(describe(workload.pids(), workload.ports))
        options = replace(options, ports=frozenset(workload.ports.values()))
        run_trace(options, output, before_run=workload.start_clients, record_to=record,
                  stop=stop, notices=notices)
    finally:
        workload.stop()


@main.command(context_settings={"auto_envvar_prefix": "CLOSEWAIT", "show_default": True})
@click.option("--node-name", help="Node label of the metrics and records (Kubernetes: set"
              " CLOSEWAIT_NODE_NAME from spec.nodeName).  [default: the hostname]")
@click.option("--log", default="-", help="Where the JSON records go: '-' (stdout, for the"
              " journal or the container log) or a file, rotated by size.")
@click.option("--log-max-bytes", type=click.IntRange(4096), default=50 << 20,
              help="Rotate the --log file when it would pass this size.")
@click.option("--log-backups", type=click.IntRange(0, 100), default=3,
              help="Rotated --log files kept (FILE.1 ... FILE.N).")
@tracing_command
def agent(node_name: str | None, log: str, log_max_bytes: int, log_backups: int, *,
          options: Options, output: Output) -> None:
    """Run as a node agent: JSON records, Prometheus metrics with /healthz and /readyz on
    --metrics (default 127.0.0.1:9466), no terminal output. Every option can be given as
    CLOSEWAIT_<OPTION> in the environment (CLOSEWAIT_METRICS=0.0.0.0:9466)."""
    from .agent import DEFAULT_LISTEN, AgentConfig, run_agent

    with edge():
        if output.plain:
            raise UsageError("the agent writes JSON records only: drop --plain")
        sys.exit(run_agent(AgentConfig(
            options, listen=output.metrics or DEFAULT_LISTEN, node_name=node_name, log=log,
            log_max_bytes=log_max_bytes, log_backups=log_backups,
            timeline_export=output.export)))
