"""Start-up and the run: from options to a live World, and a session on it until stopped.

`open_live_world` checks the privileges, mounts tracefs where it is missing, probes the
kernel's features, picks the backend, finds header trees, then compiles, loads and attaches
the programs (attach.py). `trace` runs a session on that world (recorded when asked) until a
signal, the duration or an error ends it, and always detaches. The CLI and the agent both
start tracing through here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import IO, Any

from .kernel import btf
from .kernel.attach import ProbeSettings, Probes
from .errors import CloseWaitError, OutputError, PrivilegeError, UsageError
from .kernel.features import Backend, KernelFeatures, choose_backend, ensure_tracefs, is_privileged, \
    probe_features
from .kernel.headers import HeaderCandidate, candidate_header_dirs, user_header_dir
from .acceptwatch import DutyCycle
from .options import Options
from .facts.enrich import resolve_target
from .outputs.record import RecordingWorld
from .outputs.render import Renderer
from .session import Session
from .world import LiveWorld, World


def open_live_world(
    options: Options,
    notice: Callable[[str], None],
    on_compile: Callable[[HeaderCandidate], None] | None = None,
) -> tuple[LiveWorld, dict[str, Any]]:
    """Check the privileges, pick a backend, compile, attach."""
    privileged, why = is_privileged()
    if not privileged:
        raise PrivilegeError(f"closewait-trace needs privileges to load BPF programs: {why}")
    for text in ensure_tracefs():
        notice(text)
    features = probe_features()
    backend = choose_backend(features, options.backend)
    if options.kernel_headers is not None:
        headers = [user_header_dir(options.kernel_headers)]
    else:
        headers = candidate_header_dirs()
    settings = _probe_settings(options, backend, features, notice)
    probes = Probes.load(settings, headers, on_compile=on_compile)
    for text in probes.notices:
        notice(text)
    return LiveWorld(probes), _ready_info(options, backend, probes)


def _probe_settings(options: Options, backend: Backend, features: KernelFeatures,
                    notice: Callable[[str], None]) -> ProbeSettings:
    accept_nargs = features.inet_csk_accept_args
    forced = os.environ.get("CLOSEWAIT_ACCEPT_NARGS")
    if forced:
        # A testing aid: declare another inet_csk_accept signature than the kernel's BTF
        # says, to show that the VM matrix catches a wrong fexit program.
        accept_nargs = int(forced)
        notice(f"CLOSEWAIT_ACCEPT_NARGS={forced}: inet_csk_accept declared with {forced}"
               f" arguments (BTF says {features.inet_csk_accept_args})")
    try:
        sys_accept4_nargs = btf.func_arg_count("__sys_accept4") if features.btf else None
        hashdance = bool(features.btf) and \
            btf.func_btf_id("inet_csk_complete_hashdance") is not None
    except CloseWaitError:
        sys_accept4_nargs, hashdance = None, False
    return ProbeSettings(
        backend=backend, accept_nargs=accept_nargs, sys_accept4_nargs=sys_accept4_nargs,
        complete_hashdance=hashdance,
        report_min_ns=options.report_min_ns, pids=frozenset(options.pids),
        ports=frozenset(options.ports), netns=options.netns, timeline_all=options.timeline_all,
        max_socks=options.max_socks, max_cw=options.max_cw, owner_room=options.owner_room,
    )


def _ready_info(options: Options, backend: Backend, probes: Probes) -> dict[str, Any]:
    """What the `ready` record says about this run (and a recording's header keeps)."""
    target = ("pid " + ",".join(str(p) for p in sorted(options.pids)) if options.pids
              else "all processes")
    if options.ports:
        target += " port " + ",".join(str(p) for p in sorted(options.ports))
    return {
        "target": target,
        "backend": backend.label,
        "pids": sorted(options.pids),
        "ports": sorted(options.ports),
        "threshold_s": options.threshold_ns / 1e9,
        "report_min_s": options.report_min_ns / 1e9,
        "headers": str(probes.header.path) if probes.header else None,
        "kernel": os.uname().release,
        "tracer_pid": os.getpid(),
        "wall_offset_ns": time.time_ns() - time.monotonic_ns(),
        "accept_watch": options.accept_watch.value if backend is Backend.TRACEPOINT else "always",
        "accept_watch_cycle": DutyCycle().as_info(),
        "features_off": dict(probes.kernel_fields.disabled),
        "state_probe": probes.kernel_fields.state_probe,
        "events": probes.event_path.value,
    }


def resolve_targets(options: Options, notice: Callable[[str], None]) -> Options:
    """The -p PIDs checked: a thread id stands for its process (with a notice); a PID that
    is no process to trace raises UsageError (enrich.resolve_target)."""
    pids = set()
    for pid in options.pids:
        target, text = resolve_target(pid)
        pids.add(target)
        if text:
            notice(text)
    return replace(options, pids=frozenset(pids))


def stop_on_signals() -> threading.Event:
    """The one signal handler: SIGINT, SIGTERM and SIGHUP ask the session to stop after its
    current tick (before it starts: as soon as it would start)."""
    stop = threading.Event()

    def _stop(_signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    return stop


def trace(options: Options, renderer: Renderer, *, stop: threading.Event,
          record: IO[str] | None = None, before_run: Callable[[], None] | None = None,
          on_compile: Callable[[HeaderCandidate], None] | None = None,
          compiled: Callable[[], None] = lambda: None,
          info_extra: dict[str, Any] | None = None) -> None:
    """Attach, run a session until stopped (recorded to `record` when given), render its
    summary, detach. A recording that failed mid-run raises OutputError after the summary."""
    try:
        live, info = open_live_world(options, renderer.notice, on_compile)
    finally:
        compiled()
    info.update(info_extra or {})
    world: World = live
    if record is not None:
        world = RecordingWorld(live, record, options=options.to_dict(), info=info,
                               on_error=renderer.notice)
    try:
        session = Session(options, renderer, world, info, stop_event=stop)
        session.start()
        if before_run is not None:
            before_run()
        session.run()
    finally:
        live.close()
    if isinstance(world, RecordingWorld) and world.error is not None:
        raise OutputError(f"{getattr(record, 'name', 'the recording')}: {world.error};"
                          f" {world.records_dropped} records not written (the trace above"
                          " is complete)")
