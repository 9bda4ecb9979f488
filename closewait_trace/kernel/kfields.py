"""Kernel struct fields the BPF programs read, at the running kernel's offsets.

The programs never include a kernel struct definition (they compile against any header set,
even another kernel's): where they need a field, they read it with
``bpf_probe_read_kernel(&v, sizeof v, (void *)ptr + CW_OFF_<NAME>)``, and the offset comes
from the running kernel's BTF (/sys/kernel/btf/vmlinux), passed to the compiler as a
``-D`` constant. ``KERNEL_FIELDS`` is the one table of those fields: a feature that needs a
new field adds a row. A feature whose fields are not all found (no BTF, a renamed member, a
size the C does not expect) is compiled out (``CW_HAVE_<FEATURE>`` undefined) and said so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import btf as _btf
from ..errors import TracingUnavailableError

__all__ = ["CLASSIC_TRACEPOINT_ENV", "KernelField", "KERNEL_FIELDS", "KernelFields",
           "resolve_kernel_fields"]


@dataclass(frozen=True)
class KernelField:
    """One field the C reads: ``CW_OFF_<name>`` is ``offsetof(struct <struct>, <path>)``."""

    name: str
    struct: str
    path: str
    size: int  # bytes the C reads: the kernel's member must have this size
    feature: str  # what needs it; compiled in as CW_HAVE_<FEATURE> when all its rows resolve


KERNEL_FIELDS: tuple[KernelField, ...] = (
    # A socket's CLOSE_WAIT ended because its holder exited or was killed (issue 15): the
    # close runs in the exiting task (PF_EXITING in flags), whose exit code is set by then.
    KernelField("TASK_FLAGS", "task_struct", "flags", 4, "process-exit"),
    KernelField("TASK_EXIT_CODE", "task_struct", "exit_code", 4, "process-exit"),
    # Room per owner in the cw map (issue 15, event flooding): the uid a socket belongs to.
    KernelField("SOCK_UID", "sock", "sk_uid", 4, "owner-room"),
    # Each socket's network namespace (issue 10): sk->__sk_common.skc_net.net->ns.inum, and the
    # accepting task's (current->nsproxy->net_ns->ns.inum) for the tracepoint backend's match.
    KernelField("SOCK_NET", "sock", "__sk_common.skc_net", 8, "netns"),
    KernelField("NET_INUM", "net", "ns.inum", 4, "netns"),
    KernelField("TASK_NSPROXY", "task_struct", "nsproxy", 8, "netns"),
    KernelField("NSPROXY_NET", "nsproxy", "net_ns", 8, "netns"),
    # The listener a child is queued on (issue 10), by the inode userspace finds it by:
    # listener->sk_socket->file->f_inode->i_ino. sk_socket alone also tells the tracepoint
    # backend's accept match a socket accept() returned (grafted) from one still queued.
    KernelField("SOCK_SOCKET", "sock", "sk_socket", 8, "listener-link"),
    KernelField("SOCKET_FILE", "socket", "file", 8, "listener-link"),
    KernelField("FILE_INODE", "file", "f_inode", 8, "listener-link"),
    KernelField("INODE_INO", "inode", "i_ino", 8, "listener-link"),
    # State changes from the raw tracepoint (issue 12): the kernel does not fill the classic
    # tracepoint's record first; the program reads what it needs of the socket itself.
    KernelField("SOCK_PROTOCOL", "sock", "sk_protocol", 2, "raw-tracepoint"),
    KernelField("SOCK_FAMILY", "sock", "__sk_common.skc_family", 2, "raw-tracepoint"),
    # inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) releases the port (skc_num = 0)
    # before the tracepoint fires; the classic tracepoint reports inet_sport too.
    KernelField("INET_SPORT", "inet_sock", "inet_sport", 2, "raw-tracepoint"),
    KernelField("SOCK_DPORT", "sock", "__sk_common.skc_dport", 2, "raw-tracepoint"),
    KernelField("SOCK_RCV_SADDR", "sock", "__sk_common.skc_rcv_saddr", 4, "raw-tracepoint"),
    KernelField("SOCK_DADDR", "sock", "__sk_common.skc_daddr", 4, "raw-tracepoint"),
    KernelField("SOCK_V6_RCV_SADDR", "sock", "__sk_common.skc_v6_rcv_saddr", 16,
                "raw-tracepoint"),
    KernelField("SOCK_V6_DADDR", "sock", "__sk_common.skc_v6_daddr", 16, "raw-tracepoint"),
)

#: A testing aid: the classic tracepoint even where the raw one can be used, so that the
#: fallback runs on the kernels we have.
CLASSIC_TRACEPOINT_ENV = "CLOSEWAIT_CLASSIC_TRACEPOINT"


def _macro(feature: str) -> str:
    return "CW_HAVE_" + feature.upper().replace("-", "_")


@dataclass(frozen=True)
class KernelFields:
    """The resolved table: offsets of the fields of every feature that is on, and for each
    feature that is off, why."""

    offsets: Mapping[str, int] = field(default_factory=dict)
    enabled: frozenset[str] = frozenset()
    disabled: Mapping[str, str] = field(default_factory=dict)

    def cflags(self) -> list[str]:
        flags = [f"-DCW_OFF_{name}={off}" for name, off in sorted(self.offsets.items())]
        return flags + [f"-D{_macro(feature)}" for feature in sorted(self.enabled)]

    def notices(self) -> list[str]:
        return [f"{feature} is off: {why}" for feature, why in sorted(self.disabled.items())]

    def without(self, feature: str, why: str) -> KernelFields:
        """The same table with ``feature`` off (its offsets dropped), for ``why``."""
        if feature not in self.enabled:
            return self
        names = {r.name for r in KERNEL_FIELDS if r.feature == feature}
        return KernelFields(
            offsets={k: v for k, v in self.offsets.items() if k not in names},
            enabled=self.enabled - {feature},
            disabled={**self.disabled, feature: why})

    @property
    def state_probe(self) -> str:
        """Where the programs hear of TCP state changes."""
        if "raw-tracepoint" in self.enabled:
            return "raw_tp/inet_sock_set_state"
        return "tracepoint/sock/inet_sock_set_state"


def _problem(btf: _btf.BtfFile, row: KernelField) -> tuple[int | None, str]:
    """(offset, "") or (None, why not)."""
    where = f"{row.struct}.{row.path}"
    found = btf.member(row.struct, row.path)
    if found is None:
        return None, f"{where} is not in the kernel's BTF"
    if found.size != row.size:
        return None, f"{where} is {found.size} bytes on this kernel, {row.size} expected"
    return found.offset, ""


def resolve_kernel_fields(fields: Iterable[KernelField] = KERNEL_FIELDS,
                          path: Path = _btf.VMLINUX_BTF) -> KernelFields:
    """Offsets of ``fields`` in the BTF at ``path``; a feature with any field missing is off."""
    rows = list(fields)
    features = sorted({r.feature for r in rows})
    try:
        btf = _btf.load_btf(path)
    except TracingUnavailableError as exc:
        return KernelFields(disabled={f: f"no kernel struct offsets ({exc})" for f in features})
    offsets: dict[str, int] = {}
    disabled: dict[str, str] = {}
    for row in rows:
        off, why = _problem(btf, row)
        if off is None:
            disabled.setdefault(row.feature, why)
        else:
            offsets[row.name] = off
    wanted = {r.name for r in rows if r.feature not in disabled}
    return KernelFields(
        offsets={k: v for k, v in offsets.items() if k in wanted},
        enabled=frozenset(f for f in features if f not in disabled),
        disabled=disabled,
    )
