"""Start-up: from options to a live World, ready to trace.

Checks the privileges, mounts tracefs where it is missing, probes the kernel's features, picks
the backend, finds header trees, then compiles, loads and attaches the programs (attach.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from . import btf
from .attach import ProbeSettings, Probes
from .errors import CloseWaitError, PrivilegeError, UsageError
from .features import Backend, choose_backend, ensure_tracefs, is_privileged, probe_features
from .headers import HeaderCandidate, candidate_header_dirs, user_header_dir
from .options import Options
from .world import LiveWorld


def open_live_world(
    options: Options,
    notice: Callable[[str], None],
    on_compile: Callable[[HeaderCandidate], None] | None = None,
) -> tuple[LiveWorld, dict[str, Any]]:
    """Check the targets and privileges, pick a backend, compile, attach."""
    for pid in options.pids:
        if not os.path.exists(f"/proc/{pid}"):
            raise UsageError(f"no process with PID {pid}")
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
    except CloseWaitError:
        sys_accept4_nargs = None
    settings = ProbeSettings(
        backend=backend,
        accept_nargs=accept_nargs,
        sys_accept4_nargs=sys_accept4_nargs,
        report_min_ns=options.report_min_ns,
        pids=frozenset(options.pids),
        ports=frozenset(options.ports),
        timeline_all=options.timeline_all,
        max_socks=options.max_socks,
        max_cw=options.max_cw,
    )
    probes = Probes.load(settings, headers, on_compile=on_compile)
    for text in probes.notices:
        notice(text)
    target = (
        "pid " + ",".join(str(p) for p in sorted(options.pids)) if options.pids else "all processes"
    )
    if options.ports:
        target += " port " + ",".join(str(p) for p in sorted(options.ports))
    info: dict[str, Any] = {
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
    }
    return LiveWorld(probes), info
