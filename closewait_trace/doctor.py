"""`closewait-trace doctor`: what will run here and why, as typed checks.

Without the privileges to look (tracefs, the BPF syscall), the checks that need them are
marked unknown, never "missing": an unprivileged look cannot tell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import CloseWaitError


@dataclass(frozen=True)
class Check:
    name: str
    #: True: fine; False: missing or broken; None: unknown (could not be looked at)
    ok: bool | None
    detail: str
    #: tracing is impossible when this one is missing (not just one backend or one feature)
    required: bool = True


#: Exit statuses of `doctor`: tracing possible, impossible, or unknown for lack of privileges.
OK, IMPOSSIBLE, NEEDS_PRIVILEGES = 0, 1, 77


def doctor_checks() -> tuple[list[Check], int]:
    """Every check, and the exit status they add up to."""
    from .kernel.features import is_privileged

    privileged, why = is_privileged()
    checks = [Check("privileges", privileged, f"ok ({why})" if privileged else why)]
    if privileged:
        checks += _kernel_checks()
    else:
        checks.append(Check("tracefs, tracepoints, backends", None,
                            "unknown: looking needs root (run `sudo closewait-trace doctor`)"))
    checks += _userspace_checks()
    if any(c.ok is False and c.required for c in checks if c.name != "privileges"):
        return checks, IMPOSSIBLE
    return checks, OK if privileged else NEEDS_PRIVILEGES


def _kernel_checks() -> list[Check]:
    from .kernel.features import choose_backend, ensure_tracefs, probe_features, requirements

    checks: list[Check] = []
    try:
        checks += [Check("tracefs", True, notice) for notice in ensure_tracefs()]
    except CloseWaitError as exc:
        checks.append(Check("tracefs", False, str(exc)))
    feats = probe_features()
    checks.append(Check("kernel", True, feats.release))
    checks.append(Check("tracefs", feats.tracefs is not None,
                        str(feats.tracefs or "not mounted")))
    checks.append(Check("btf", feats.btf, "/sys/kernel/btf/vmlinux" if feats.btf else "missing",
                        required=False))
    for req in requirements(feats):  # BCC's version, then what each part needs and has here
        checks.append(Check(req.name, req.met, f"needs {req.needs}: {req.detail}",
                            required=req.required))
    checks += _field_checks()
    try:
        backend = choose_backend(feats, None)
        checks.append(Check("backend", True, f"{backend.label} will be used"))
    except CloseWaitError as exc:
        checks.append(Check("backend", False, str(exc)))
    return checks


def _field_checks() -> list[Check]:
    """The features built on kernel struct offsets (from BTF): on, or off and why."""
    from .kernel.kfields import resolve_kernel_fields

    fields = resolve_kernel_fields()
    return [Check(f"feature {name}", name not in fields.disabled,
                  fields.disabled.get(name, "on (struct offsets from the running kernel's BTF)"),
                  required=False)
            for name in sorted(fields.enabled | set(fields.disabled))]


def _userspace_checks() -> list[Check]:
    from .kernel.attach import import_bcc
    from .kernel.headers import candidate_header_dirs

    checks: list[Check] = []
    try:
        cands = candidate_header_dirs()
        checks.append(Check("headers", bool(cands),
                            "; ".join(f"{c.origin}: {c.path}" for c in cands[:3]) or "none found"))
    except CloseWaitError as exc:
        checks.append(Check("headers", False, str(exc)))
    try:
        bcc = import_bcc()
        checks.append(Check("bcc", True,
                            f"python module at {os.path.dirname(bcc.__file__ or '')}"))
    except CloseWaitError as exc:
        checks.append(Check("bcc", False, str(exc)))
    return checks
