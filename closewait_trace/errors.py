"""Typed errors raised by the library; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class CloseWaitError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code = 1


class UsageError(CloseWaitError):
    """The user asked for something that cannot be done as asked (bad PID, port, duration)."""

    exit_code = 2


class PrivilegeError(CloseWaitError):
    """The tracer lacks the privileges it needs (root, or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN)."""

    exit_code = 77


class BccMissingError(CloseWaitError):
    """The BCC Python module or its library is not installed."""

    exit_code = 69


class KernelHeadersError(CloseWaitError):
    """No usable kernel header tree was found or none compiled the programs."""

    exit_code = 69


class TracingUnavailableError(CloseWaitError):
    """The running kernel offers no mechanism the tracer can use (tracepoint missing, no BPF)."""

    exit_code = 69


class BpfLoadError(CloseWaitError):
    """The BPF programs failed to compile, load or attach."""

    exit_code = 70


class EnrichError(CloseWaitError):
    """Userspace enrichment failed: the sock_diag netlink query, or a process's /proc entries."""

    exit_code = 74


class OutputError(CloseWaitError):
    """An output the user asked for cannot be written (a recording, an export, the metrics
    address)."""

    exit_code = 73
