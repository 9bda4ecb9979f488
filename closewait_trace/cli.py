"""CLI stage: options in, one clear line and an exit code out on any error.

`closewait-trace [OPTIONS]` traces live; `doctor` says what will run and why; `demo` starts a
built-in workload and traces it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from . import __version__
from .errors import CloseWaitError, UsageError
from .headers import HeaderCandidate
from .render import JsonRenderer, LiveRenderer, PlainRenderer, Renderer

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
          "h": 3_600_000_000_000}


def parse_duration(text: str) -> int:
    """'10s', '500ms', '2m', '1h', '1.5' (seconds) -> nanoseconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*", text)
    if not m:
        raise UsageError(f"bad duration {text!r}: use e.g. 500ms, 10s, 2m")
    value = int(float(m.group(1)) * _UNITS[m.group(2) or "s"])
    if value <= 0:
        raise UsageError(f"bad duration {text!r}: must be greater than zero")
    return int(value)


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


def _tracing_options(fn: F) -> F:
    opts = [
        click.option("--threshold", type=DURATION, default="10s", show_default=True,
                     help="Age in CLOSE_WAIT at which a socket is flagged as a leak."),
        click.option("--report-min", type=DURATION, default="200ms", show_default=True,
                     help="Stays in CLOSE_WAIT shorter than this are only counted, not listed."),
        click.option("--backend", type=click.Choice(["auto", "kprobe", "fentry", "tracepoint"]),
                     default="auto", show_default=True,
                     help="How accept() and close() are seen; auto picks the best available."),
        click.option("--kernel-headers", type=click.Path(path_type=Path),
                     help="Kernel header tree to compile against (default: found automatically)."),
        click.option("--json", "as_json", is_flag=True, help="One JSON object per line "
                     "(docs/json-schema.md)."),
        click.option("--plain", is_flag=True, help="Plain lines even on a terminal."),
        click.option("--timeline", "timeline", type=click.Choice(["flagged", "all"]),
                     is_flag=False, flag_value="flagged", default=None,
                     help="Print the lifecycle timeline of each flagged socket; `--timeline all`:"
                     " of every socket matching the filters (the kernel then sends their"
                     " transitions)."),
        click.option("--timeline-export", type=click.Path(path_type=Path, dir_okay=False),
                     help="Also write the timelines shown to this .html or .svg file."),
        click.option("--metrics", metavar="[ADDR:]PORT",
                     help="Serve Prometheus metrics on this port (bound to 127.0.0.1 unless an"
                     " address is given)."),
        click.option("--accept-watch", type=click.Choice(["auto", "always"]), default="auto",
                     show_default=True,
                     help="Tracepoint backend only: trace accept() through the syscall"
                     " tracepoints only while never-accepted sockets need explaining (auto),"
                     " or all the time (they slow every syscall a little)."),
        click.option("--max-sockets", type=click.IntRange(1024, 1 << 22), default=131072,
                     show_default=True, help="Size of the kernel's per-socket map."),
        click.option("--max-close-wait", type=click.IntRange(256, 1 << 22), default=32768,
                     show_default=True, help="Size of the kernel's CLOSE_WAIT map."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _renderer(as_json: bool, plain: bool, timelines: str | None = None,
              export: Path | None = None) -> Renderer:
    from .timeline import Exporter

    exporter = Exporter(export) if export is not None else None
    if export is not None and timelines is None:
        timelines = "flagged"
    if as_json:
        return JsonRenderer(sys.stdout, timelines, exporter)
    if plain or not sys.stdout.isatty():
        return PlainRenderer(sys.stdout, timelines, exporter)
    return LiveRenderer(Console(), timelines, exporter)


@contextmanager
def _errors() -> Iterator[None]:
    """Library errors become one line on stderr and the error's exit code."""
    try:
        yield
    except CloseWaitError as exc:
        click.echo(f"closewait-trace: error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _compile_notice(renderer: Renderer) -> tuple[Callable[[HeaderCandidate], None], Callable[[], None]]:
    """A spinner while BCC compiles (terminal only); returns (on_compile, done)."""
    if isinstance(renderer, LiveRenderer):
        status = renderer.console.status("compiling BPF programs")
        started = [False]

        def on_compile(cand: HeaderCandidate) -> None:
            status.update(f"compiling BPF programs against {cand.origin} ({cand.path})")
            if not started[0]:
                status.start()
                started[0] = True

        return on_compile, status.stop
    return (lambda cand: None), (lambda: None)


def run_trace(options: Any, renderer: Renderer, *, record_to: Path | None = None,
              before_run: Callable[[], None] | None = None, metrics: str | None = None) -> int:
    """Attach, trace until stopped, render the summary; optionally record to a file."""
    from .record import RecordingWorld
    from .session import Session, open_live_world
    from .world import World

    stop = {"now": False}

    def _early_stop(signum: int, _frame: object) -> None:
        stop["now"] = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _early_stop)
    on_compile, done = _compile_notice(renderer)
    try:
        live, info = open_live_world(options, renderer.notice, on_compile)
    finally:
        done()
    world: World = live
    if metrics is not None:
        from . import enrich
        from .metrics import MetricsExporter, TeeRenderer, parse_listen

        try:
            host, port = parse_listen(metrics)
            exporter = MetricsExporter(host, port, listeners=enrich.listeners)
            exporter.start()
        except BaseException:
            live.close()
            raise
        renderer.notice(f"Prometheus metrics on http://{host}:{port}/metrics")
        renderer = TeeRenderer(renderer, exporter)
    out = None
    if record_to is not None:
        try:
            out = open(record_to, "w", encoding="utf-8")
        except OSError as exc:
            live.close()
            raise UsageError(f"cannot write {record_to}: {exc.strerror}") from exc
        world = RecordingWorld(live, out, options=options.to_dict(), info=info)
    try:
        session = Session(options, renderer, world, info)
        session.install_signal_handlers()
        if stop["now"]:
            session.stop_event.set()
        session.start()
        if before_run is not None:
            before_run()
        session.run()
    finally:
        live.close()
        if out is not None:
            out.close()
    return 0


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="closewait-trace")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Trace only sockets owned by this process (and its children). Repeatable.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Trace only sockets with this local or remote port. Repeatable.")
@click.option("--duration", type=DURATION, default=None,
              help="Stop after this long (default: until Ctrl-C, SIGTERM or SIGHUP).")
@_tracing_options
@click.pass_context
def main(ctx: click.Context, pids: tuple[int, ...], ports: tuple[int, ...], duration: int | None,
         threshold: int, report_min: int, backend: str, kernel_headers: Path | None,
         as_json: bool, plain: bool, timeline: str | None, timeline_export: Path | None,
         metrics: str | None, accept_watch: str, max_sockets: int,
         max_close_wait: int) -> None:
    """Trace TCP sockets in CLOSE_WAIT live: who owns them, whether they were accepted,
    whether they were closed, and why they leak.

    With no command, traces every process (or those given with -p) until stopped.
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[-1] for p in ctx.command.params
                 if p.name and ctx.get_parameter_source(p.name)
                 is not click.core.ParameterSource.DEFAULT]
        if given:
            click.echo(f"closewait-trace: error: put {given[0]} after the command name"
                       f" ({ctx.invoked_subcommand})", err=True)
            sys.exit(2)
        return
    with _errors():
        options = _options(pids, ports, duration, threshold, report_min, backend, kernel_headers,
                           max_sockets, max_close_wait, timeline, timeline_export,
                           accept_watch)
        sys.exit(run_trace(options, _renderer(as_json, plain, options.timelines,
                                              timeline_export), metrics=metrics))


def _options(pids: tuple[int, ...], ports: tuple[int, ...], duration: int | None,
             threshold: int, report_min: int, backend: str, kernel_headers: Path | None,
             max_sockets: int, max_close_wait: int, timeline: str | None = None,
             timeline_export: Path | None = None, accept_watch: str = "auto") -> Any:
    from .session import Options

    if timeline_export is not None and timeline is None:
        timeline = "flagged"

    for pid in pids:
        if pid <= 0:
            raise UsageError(f"bad PID {pid}")
    if threshold < report_min:
        raise UsageError("--threshold must not be shorter than --report-min")
    return Options(
        pids=frozenset(pids), ports=frozenset(ports), threshold_ns=threshold,
        report_min_ns=report_min, backend=backend, kernel_headers=kernel_headers,
        duration_s=duration / 1e9 if duration else None, max_socks=max_sockets,
        max_cw=max_close_wait, timelines=timeline, timeline_all=timeline == "all",
        accept_watch=accept_watch,
    )


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="File to write the recording to.")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Trace only sockets owned by this process (and its children). Repeatable.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Trace only sockets with this local or remote port. Repeatable.")
@click.option("--duration", type=DURATION, default=None,
              help="Stop after this long (default: until Ctrl-C, SIGTERM or SIGHUP).")
@_tracing_options
def record(output: Path, pids: tuple[int, ...], ports: tuple[int, ...], duration: int | None,
           threshold: int, report_min: int, backend: str, kernel_headers: Path | None,
           as_json: bool, plain: bool, timeline: str | None, timeline_export: Path | None,
           metrics: str | None, accept_watch: str, max_sockets: int,
           max_close_wait: int) -> None:
    """Trace live as the main command does, and record the trace to a file that
    `closewait-trace report` reads back on any machine, without root or BPF."""
    with _errors():
        options = _options(pids, ports, duration, threshold, report_min, backend, kernel_headers,
                           max_sockets, max_close_wait, timeline, timeline_export,
                           accept_watch)
        sys.exit(run_trace(options, _renderer(as_json, plain, options.timelines,
                                              timeline_export), record_to=output,
                           metrics=metrics))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("-p", "--pid", "pids", type=int, multiple=True,
              help="Only sockets owned by this process. Repeatable.")
@click.option("--port", "ports", type=click.IntRange(1, 65535), multiple=True,
              help="Only sockets with this local or remote port. Repeatable.")
@click.option("-v", "--verbose", is_flag=True, help="List every socket too.")
def snapshot(as_json: bool, pids: tuple[int, ...], ports: tuple[int, ...],
             verbose: bool) -> None:
    """Show the sockets in CLOSE_WAIT now, grouped by process and listener, with the causes
    a single look can tell (no BPF needed: sock_diag and /proc only)."""
    import json

    from .snapshot import render_lines, take

    with _errors():
        snap = take(ports=frozenset(ports), pids=frozenset(pids))
        if as_json:
            click.echo(json.dumps(snap.as_dict()))
        else:
            for line in render_lines(snap, verbose):
                click.echo(line)
    sys.exit(0)


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--timeline", type=click.Choice(["flagged", "all"]), is_flag=False,
              flag_value="flagged", default=None,
              help="Timelines to show (default: those the recording was made with).")
@click.option("--timeline-export", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the timelines shown to this .html or .svg file.")
def report(file: Path, as_json: bool, timeline: str | None, timeline_export: Path | None) -> None:
    """Rebuild the summary, leaks, diagnoses and timelines of a recording (no root needed)."""
    from .record import RecordFormatError, open_replay
    from .session import Options, Session
    from .world import WorldEnded

    with _errors():
        world = open_replay(file)
        header = world.header
        options = Options.from_dict(header["options"])
        renderer = _renderer(as_json, True, timeline or options.timelines, timeline_export)
        if not as_json:
            renderer.notice(
                f"report of {file}: recorded {header.get('created')} on {header.get('host')}"
                f" (kernel {header.get('kernel')})"
            )
        try:
            session = Session(options, renderer, world, dict(header["info"]))
        except WorldEnded:
            raise RecordFormatError(world.error or f"{file}: no records") from None
        session.start()
        session.run()
        if world.error is not None:
            click.echo(f"closewait-trace: error: {world.error}; the report above covers"
                       " everything before it", err=True)
            sys.exit(65)
    sys.exit(0)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool) -> None:
    """Say which backend will run and why; exit non-zero if tracing is impossible."""
    import json

    from .features import choose_backend, ensure_tracefs, is_privileged, probe_features, \
        requirements
    from .headers import candidate_header_dirs

    checks: list[tuple[str, bool, str]] = []
    fatal = False
    ok, why = is_privileged()
    checks.append(("privileges", ok, why if not ok else "ok (" + (why or "root") + ")"))
    if ok:
        try:
            for notice in ensure_tracefs():
                checks.append(("tracefs", True, notice))
        except CloseWaitError as exc:
            checks.append(("tracefs", False, str(exc)))
    else:
        fatal = True
    feats = probe_features()
    checks.append(("kernel", True, feats.release))
    checks.append(("tracefs", feats.tracefs is not None, str(feats.tracefs or "not mounted")))
    checks.append(("btf", feats.btf, "/sys/kernel/btf/vmlinux" if feats.btf else "missing"))
    for req in requirements(feats):  # BCC's version, then what each part needs and has here
        checks.append((req.name, req.met is not False, f"needs {req.needs}: {req.detail}"))
        fatal = fatal or (req.required and req.met is False)
    try:
        backend = choose_backend(feats, None)
        checks.append(("backend", True, f"{backend.label} will be used"))
    except CloseWaitError as exc:
        checks.append(("backend", False, str(exc)))
        fatal = True
    try:
        cands = candidate_header_dirs()
        checks.append(("headers", bool(cands),
                       "; ".join(f"{c.origin}: {c.path}" for c in cands[:3]) or "none found"))
        fatal = fatal or not cands
    except CloseWaitError as exc:
        checks.append(("headers", False, str(exc)))
        fatal = True
    try:
        from .attach import import_bcc

        bcc = import_bcc()
        checks.append(("bcc", True, f"python module at {os.path.dirname(bcc.__file__ or '')}"))
    except CloseWaitError as exc:
        checks.append(("bcc", False, str(exc)))
        fatal = True
    if as_json:
        click.echo(json.dumps({"ok": not fatal, "checks": [
            {"check": n, "ok": o, "detail": d} for n, o, d in checks]}))
    else:
        for name, good, detail in checks:
            mark = "ok " if good else "-- "
            click.echo(f"{mark} {name:<28} {detail}")
        click.echo("tracing is possible" if not fatal else "tracing is NOT possible here")
    sys.exit(1 if fatal else 0)


def _scenario_names() -> list[str]:
    from .scenarios import SCENARIOS

    return list(SCENARIOS)


@main.command()
@click.option("--scenario", type=click.Choice(_scenario_names()), default=None,
              help="Which workload to run: one real-world case each (see --list-scenarios);"
              " default: the mixed demo.")
@click.option("--list-scenarios", is_flag=True, help="List the scenarios and exit.")
@click.option("--duration", type=DURATION, default=None,
              help="How long to run the demo.  [default: the scenario's; 20s for the mixed"
              " demo]")
@click.option("--threshold", type=DURATION, default=None,
              help="Leak threshold for the demo.  [default: the scenario's; 3s for the mixed"
              " demo]")
@click.option("--backend", type=click.Choice(["auto", "kprobe", "fentry", "tracepoint"]),
              default="auto", show_default=True,
              help="How accept() and close() are seen; auto picks the best available.")
@click.option("--kernel-headers", type=click.Path(path_type=Path),
              help="Kernel header tree to compile against (default: found automatically).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--plain", is_flag=True, help="Plain lines even on a terminal.")
@click.option("-o", "--record", type=click.Path(path_type=Path, dir_okay=False),
              help="Also record the trace to this file (see `report`).")
@click.option("--timeline", type=click.Choice(["none", "flagged", "all"]), default="flagged",
              show_default=True, help="Which lifecycle timelines to print.")
@click.option("--timeline-export", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write the timelines shown to this .html or .svg file.")
@click.option("--accept-watch", type=click.Choice(["auto", "always"]), default="auto",
              show_default=True,
              help="Tracepoint backend only: trace accept() all the time (always), or only"
              " while never-accepted sockets need explaining (auto).")
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
    from .demo import Workload
    from .scenarios import DEFAULT, SCENARIOS, ScenarioRun, describe, listing
    from .session import Options

    if list_scenarios:
        for line in listing():
            click.echo(line)
        sys.exit(0)
    chosen = SCENARIOS[scenario or DEFAULT]
    if duration is None:
        duration = int(chosen.duration_s * 1e9)
    if threshold is None:
        threshold = int(chosen.threshold_s * 1e9)
    timelines = None if timeline == "none" else timeline
    with _errors(), _children_stop_on_signals():
        renderer = _renderer(as_json, plain, timelines, timeline_export)
        if scenario is not None:
            renderer.notice(chosen.notice)
        workload: Workload | ScenarioRun = (
            ScenarioRun(chosen) if chosen.roles else Workload())
        try:
            workload.start_servers()
            if isinstance(workload, Workload):
                renderer.notice(
                    "demo: " + ", ".join(f"{n} pid {p} port {workload.ports.get(n, '-')}"
                                          for n, p in workload.pids().items())
                )
            else:
                renderer.notice(describe(workload.pids(), workload.ports))
            options = Options(
                ports=frozenset(workload.ports.values()),
                threshold_ns=threshold, report_min_ns=min(200_000_000, threshold),
                backend=backend, kernel_headers=kernel_headers, duration_s=duration / 1e9,
                timelines=timelines, timeline_all=timelines == "all", accept_watch=accept_watch,
            )
            run_trace(options, renderer, before_run=workload.start_clients, record_to=record)
        finally:
            workload.stop()
    sys.exit(0)


@contextmanager
def _children_stop_on_signals() -> Iterator[None]:
    """Until the tracer takes over the signals (it then stops cleanly on them), SIGINT,
    SIGTERM and SIGHUP raise SystemExit, so that the demo's children are stopped on the way
    out."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    saved = {sig: signal.signal(sig, _raise)
             for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
