"""Typed errors raised by the library; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class CloseWaitError(Exception):
    """Base class of every error the library raises on purpose; each subclass names the
    exit status the CLI ends with."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:  # else inherited, or set in the class body
            cls.exit_code = exit_code


class UsageError(CloseWaitError, exit_code=2):
    """The user asked for something that cannot be done as asked (bad PID, port, duration)."""


class PrivilegeError(CloseWaitError, exit_code=77):
    """The tracer lacks the privileges it needs (root, or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN)."""


class BccMissingError(CloseWaitError, exit_code=69):
    """The BCC Python module or its library is not installed."""


class KernelHeadersError(CloseWaitError, exit_code=69):
    """No usable kernel header tree was found or none compiled the programs."""


class TracingUnavailableError(CloseWaitError, exit_code=69):
    """The running kernel offers no mechanism the tracer can use (tracepoint missing, no BPF)."""


class BpfLoadError(CloseWaitError, exit_code=70):
    """The BPF programs failed to compile, load or attach."""


class BpfHeaderError(BpfLoadError):
    """bpf/closewait.h, the layout shared by the BPF programs and the decoder, cannot be read
    or holds something outside the C subset the decoder reads (closewait_trace/kernel/cheader.py)."""


class EnrichError(CloseWaitError, exit_code=74):
    """Userspace enrichment failed: the sock_diag netlink query, or a process's /proc entries."""


class OutputError(CloseWaitError, exit_code=73):
    """An output the user asked for cannot be written (a recording, an export, the metrics
    address)."""
