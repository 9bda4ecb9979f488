"""What the running kernel allows: tracefs, tracepoints, kprobes, fentry, BTF, privileges.

Used to pick the tracing backend (``choose_backend``) and by ``closewait-trace doctor``.
Nothing here needs BCC: kprobes and tracepoints are detected from sysfs/tracefs, fentry by
loading and attaching a two-instruction program with the raw bpf(2) syscall, like libbpf's
feature probes do.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import platform
import resource
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import btf as _btf
from .arches import arch_of
from ..errors import TracingUnavailableError, UsageError

__all__ = [
    "SYS_KERNEL",
    "DEBUGFS_DIR",
    "TRACEFS_DIR",
    "DEBUG_TRACING_DIR",
    "KPROBE_PMU_TYPE",
    "REQUIRED_TRACEPOINT",
    "ACCEPT_TRACEPOINTS",
    "PROBED_TRACEPOINTS",
    "Backend",
    "KernelFeatures",
    "ensure_tracefs",
    "tracefs_root",
    "has_tracepoint",
    "kprobes_available",
    "fentry_probe",
    "lift_memlock_limit",
    "fentry_available",
    "btf_available",
    "is_privileged",
    "probe_features",
    "backend_status",
    "backend_reasons",
    "choose_backend",
    "Requirement",
    "requirement_rows",
    "requirements",
    "ringbuf_probe",
    "EventPath",
    "EventChoice",
    "choose_event_path",
    "FORCE_PERF_ENV",
    "PERF_PAGES_ENV",
    "kernel_symbol",
    "bcc_version",
]

SYS_KERNEL = Path("/sys/kernel")
DEBUGFS_DIR = SYS_KERNEL / "debug"
TRACEFS_DIR = SYS_KERNEL / "tracing"
DEBUG_TRACING_DIR = DEBUGFS_DIR / "tracing"
KPROBE_PMU_TYPE = Path("/sys/bus/event_source/devices/kprobe/type")

REQUIRED_TRACEPOINT = "sock:inet_sock_set_state"
#: The tracepoint backend sees accept() through these (accept4 is what libc's accept() uses).
ACCEPT_TRACEPOINTS = ("syscalls:sys_enter_accept4", "syscalls:sys_exit_accept4")
PROBED_TRACEPOINTS = (
    REQUIRED_TRACEPOINT,
    "syscalls:sys_enter_accept4",
    "syscalls:sys_exit_accept4",
    "syscalls:sys_enter_accept",
    "syscalls:sys_exit_accept",
)

Mounter = Callable[[str, Path], None]
"""mount(fstype, target): mounts a pseudo filesystem ``fstype`` (source = fstype) on target."""


# --------------------------------------------------------------------------------------------
# tracefs / debugfs
# --------------------------------------------------------------------------------------------
def _tracefs_at(path: Path) -> bool:
    """True when a tracefs is reachable at ``path`` (stat of events/ triggers automounts)."""
    try:
        return (path / "events").is_dir()
    except OSError:
        return False


def _dir_populated(path: Path) -> bool:
    """An unmounted /sys/kernel/debug is an empty sysfs directory; a mounted one is not."""
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_syscall(fstype: str, target: Path) -> None:
    libc = _libc()
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    mount.restype = ctypes.c_int
    if mount(fstype.encode(), os.fsencode(target), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(target))


def _mount_or_raise(mounter: Mounter, fstype: str, target: Path) -> None:
    try:
        mounter(fstype, target)
    except OSError as e:
        hint = (
            " (needs root, or CAP_SYS_ADMIN in the initial mount namespace)"
            if e.errno in (errno.EPERM, errno.EACCES)
            else ""
        )
        raise TracingUnavailableError(
            f"cannot mount {fstype} on {target}: {e.strerror or e}{hint}; "
            f"mount it yourself with: mount -t {fstype} {fstype} {target}"
        ) from None


def ensure_tracefs(*, sys_kernel: Path = SYS_KERNEL, mounter: Mounter | None = None) -> list[str]:
    """Make tracefs reachable where BCC 0.26 (``/sys/kernel/debug/tracing``) and everything
    else (``/sys/kernel/tracing``) look for it, mounting debugfs/tracefs as needed.

    Returns one human sentence per filesystem mounted (empty list: nothing to do).
    Raises TracingUnavailableError if a needed mount fails.
    ``sys_kernel`` and ``mounter`` exist for tests.
    """
    mount = mounter or _mount_syscall
    debugfs = sys_kernel / "debug"
    tracefs = sys_kernel / "tracing"
    debug_tracing = debugfs / "tracing"
    notices: list[str] = []

    if debugfs.is_dir() and not _dir_populated(debugfs):
        _mount_or_raise(mount, "debugfs", debugfs)
        notices.append(f"mounted debugfs on {debugfs} (BCC looks for tracefs under it)")
    elif not debugfs.is_dir():
        notices.append(
            f"{debugfs} does not exist (kernel without CONFIG_DEBUG_FS?): "
            f"BCC 0.26 looks for tracefs at {debug_tracing} and may fail"
        )

    if not _tracefs_at(tracefs) and not _tracefs_at(debug_tracing):
        if not tracefs.is_dir():
            raise TracingUnavailableError(
                f"tracefs is not available: neither {tracefs} nor {debug_tracing} exists "
                "(kernel without CONFIG_TRACING?)"
            )
        _mount_or_raise(mount, "tracefs", tracefs)
        notices.append(f"mounted tracefs on {tracefs}")
        if not _tracefs_at(tracefs):
            raise TracingUnavailableError(f"mounted tracefs on {tracefs} but {tracefs}/events is missing")

    # BCC 0.26 hard-codes /sys/kernel/debug/tracing.  With debugfs mounted, modern kernels
    # automount tracefs there; older ones (< 4.1) and odd setups need an explicit mount.
    if debug_tracing.is_dir() and not _tracefs_at(debug_tracing):
        _mount_or_raise(mount, "tracefs", debug_tracing)
        notices.append(f"mounted tracefs on {debug_tracing} (where BCC 0.26 looks for it)")
    return notices


def tracefs_root(*, sys_kernel: Path = SYS_KERNEL) -> Path | None:
    """Where tracefs is reachable now (``/sys/kernel/tracing`` preferred), None if nowhere."""
    for candidate in (sys_kernel / "tracing", sys_kernel / "debug" / "tracing"):
        if _tracefs_at(candidate):
            return candidate
    return None


def _split_tracepoint(tp: str) -> tuple[str, str]:
    category, _, name = tp.partition(":")
    return category, name


def has_tracepoint(category: str, name: str, *, root: Path | None = None) -> bool:
    """True if tracepoint ``category:name`` exists (``events/CAT/NAME/format`` in tracefs).

    ``root`` defaults to ``tracefs_root()``; False when tracefs is not reachable at all.
    """
    base = root if root is not None else tracefs_root()
    if base is None or not category or not name:
        return False
    try:
        return (base / "events" / category / name / "format").is_file()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# kprobes
# --------------------------------------------------------------------------------------------
def kprobes_available(*, pmu_type: Path = KPROBE_PMU_TYPE, tracefs: Path | None = None) -> bool:
    """True when the kernel can attach kprobes: the perf ``kprobe`` PMU exists (what BCC uses
    on 4.17+) or tracefs has ``kprobe_events``.  Both are absent when CONFIG_KPROBES is off.

    ``tracefs`` defaults to ``tracefs_root()``.
    """
    try:
        if pmu_type.is_file():
            return True
        root = tracefs if tracefs is not None else tracefs_root()
        return root is not None and (root / "kprobe_events").exists()
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# fentry: raw bpf(2)
# --------------------------------------------------------------------------------------------
# From include/uapi/linux/bpf.h (enum bpf_cmd, bpf_prog_type, bpf_attach_type).
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
BPF_OBJ_NAME_LEN = 16


def _u32(*names: str) -> list[tuple[str, type[ctypes.c_uint32]]]:
    """ctypes fields: a __u32 member of each name, in order."""
    return [(name, ctypes.c_uint32) for name in names]


def _u64(*names: str) -> list[tuple[str, type[ctypes.c_uint64]]]:
    """ctypes fields: a __u64 member of each name, in order."""
    return [(name, ctypes.c_uint64) for name in names]


class BpfProgLoadAttr(ctypes.Structure):
    """``union bpf_attr``, the BPF_PROG_LOAD member (up to core_relo_rec_size, as in 6.1)."""

    _fields_ = [
        *_u32("prog_type", "insn_cnt"),  # 0
        *_u64("insns", "license"),  # 8
        *_u32("log_level", "log_size"),  # 24
        *_u64("log_buf"),  # 32
        *_u32("kern_version", "prog_flags"),  # 40
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),  # 48
        *_u32("prog_ifindex", "expected_attach_type", "prog_btf_fd", "func_info_rec_size"),  # 64
        *_u64("func_info"),  # 80
        *_u32("func_info_cnt", "line_info_rec_size"),  # 88
        *_u64("line_info"),  # 96
        *_u32("line_info_cnt", "attach_btf_id"),  # 104
        *_u32("attach_btf_obj_fd", "core_relo_cnt"),  # 112 (the first: union with attach_prog_fd)
        *_u64("fd_array", "core_relos"),  # 120
        *_u32("core_relo_rec_size"),  # 136
    ]


class BpfRawTracepointAttr(ctypes.Structure):
    """``union bpf_attr``, the BPF_RAW_TRACEPOINT_OPEN member."""

    _fields_ = [
        *_u64("name"),  # 0; NULL for BPF_PROG_TYPE_TRACING programs
        *_u32("prog_fd", "_pad"),  # 8
        *_u64("cookie"),  # 16 (6.10+; must be 0 on older kernels)
    ]


class BpfLinkCreateAttr(ctypes.Structure):
    """``union bpf_attr``, the BPF_LINK_CREATE member (head and the tracing union arm)."""

    _fields_ = [
        *_u32("prog_fd", "target_fd", "attach_type", "flags", "target_btf_id", "_pad"),  # 0
        *_u64("cookie"),  # 24 (tracing.cookie, 6.10+)
    ]


# r0 = 0; exit  (struct bpf_insn {u8 code; u8 dst:4, src:4; s16 off; s32 imm;})
_BPF_MOV64_IMM_R0_0 = bytes((0xB7, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00))
_BPF_EXIT = bytes((0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00))
_RET0_PROG = _BPF_MOV64_IMM_R0_0 + _BPF_EXIT


def _bpf_syscall(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, &attr, sizeof(attr)); returns the result (an fd) or raises OSError."""
    arch = arch_of()
    if arch is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {platform.machine()}")
    libc = _libc()
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]
    ret = syscall(arch.nr_bpf, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _errno_name(e: OSError) -> str:
    code = e.errno or 0
    return f"{errno.errorcode.get(code, str(code))} ({e.strerror})"


def fentry_probe(func: str = "tcp_close", *, btf_path: Path = _btf.VMLINUX_BTF) -> tuple[bool, str]:
    """Try to load and attach an fentry program on ``func``; (ok, human explanation).

    Loads ``r0 = 0; exit`` as BPF_PROG_TYPE_TRACING / BPF_TRACE_FENTRY with
    attach_btf_id = BTF id of ``func``, attaches it with BPF_RAW_TRACEPOINT_OPEN (falling back
    to BPF_LINK_CREATE), then closes everything.  The program does nothing while attached.
    """
    try:
        btf_id = _btf.func_btf_id(func, btf_path)
    except TracingUnavailableError as e:
        return False, f"no BTF ({e})"
    if btf_id is None:
        return False, f"{func} is not in the kernel BTF"

    insns = ctypes.create_string_buffer(_RET0_PROG, len(_RET0_PROG))
    license_buf = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(16384)
    attr = BpfProgLoadAttr()
    attr.prog_type = BPF_PROG_TYPE_TRACING
    attr.insn_cnt = len(_RET0_PROG) // 8
    attr.insns = ctypes.addressof(insns)
    attr.license = ctypes.addressof(license_buf)
    attr.log_level = 1
    attr.log_size = ctypes.sizeof(log_buf)
    attr.log_buf = ctypes.addressof(log_buf)
    attr.prog_name = b"cw_fentry_probe"
    attr.expected_attach_type = BPF_TRACE_FENTRY
    attr.attach_btf_id = btf_id
    try:
        prog_fd = _bpf_syscall(BPF_PROG_LOAD, attr)
    except OSError as e:
        log = log_buf.value.decode("utf-8", "replace").strip().splitlines()
        tail = f"; verifier: {log[-1]}" if log else ""
        return False, f"BPF_PROG_LOAD of an fentry program on {func} failed: {_errno_name(e)}{tail}"
    try:
        link_fd: int | None = None
        try:
            rt = BpfRawTracepointAttr()
            rt.prog_fd = prog_fd
            link_fd = _bpf_syscall(BPF_RAW_TRACEPOINT_OPEN, rt)
        except OSError as e:
            raw_err = e
            try:
                lc = BpfLinkCreateAttr()
                lc.prog_fd = prog_fd
                lc.attach_type = BPF_TRACE_FENTRY
                link_fd = _bpf_syscall(BPF_LINK_CREATE, lc)
            except OSError as e2:
                return False, (
                    f"fentry program on {func} loaded but did not attach: "
                    f"BPF_RAW_TRACEPOINT_OPEN: {_errno_name(raw_err)}, "
                    f"BPF_LINK_CREATE: {_errno_name(e2)}"
                )
        if link_fd is not None:
            os.close(link_fd)
        return True, f"fentry program loaded and attached on {func} (BTF id {btf_id})"
    finally:
        os.close(prog_fd)


def fentry_available(func: str = "tcp_close") -> bool:
    """True when an fentry program on ``func`` both loads and attaches (see fentry_probe)."""
    return fentry_probe(func)[0]


# --------------------------------------------------------------------------------------------
# BTF, privileges
# --------------------------------------------------------------------------------------------
def btf_available(path: Path = _btf.VMLINUX_BTF) -> bool:
    """True when the kernel exposes its BTF (a readable file starting with the BTF magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head in (b"\x9f\xeb", b"\xeb\x9f")


CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
_CAP_NAMES = {CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def is_privileged(
    *,
    euid: int | None = None,
    status_text: str | None = None,
    cap_last_cap: int | None = None,
) -> tuple[bool, str]:
    """(ok, explanation): root, or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN in CapEff.

    On kernels older than 5.8 (``cap_last_cap`` < 39: CAP_BPF/CAP_PERFMON do not exist),
    CAP_SYS_ADMIN alone is what the kernel checks, and is accepted.
    Keyword arguments exist for tests; by default they are read from this process.
    """
    uid = os.geteuid() if euid is None else euid
    if uid == 0:
        return True, "running as root"
    text = status_text if status_text is not None else _read_text("/proc/self/status")
    cap_eff: int | None = None
    for line in (text or "").splitlines():
        if line.startswith("CapEff:"):
            try:
                cap_eff = int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                cap_eff = None
            break
    if cap_eff is None:
        return False, f"not root (euid {uid}) and the effective capabilities could not be read"
    if cap_last_cap is None:
        raw = _read_text("/proc/sys/kernel/cap_last_cap")
        try:
            cap_last_cap = int(raw.strip()) if raw else CAP_BPF
        except ValueError:
            cap_last_cap = CAP_BPF
    needed = [CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN] if cap_last_cap >= CAP_BPF else [CAP_SYS_ADMIN]
    missing = [_CAP_NAMES[c] for c in needed if not cap_eff >> c & 1]
    if not missing:
        return True, "not root, but has " + " + ".join(_CAP_NAMES[c] for c in needed)
    return False, (
        f"not root (euid {uid}) and missing {', '.join(missing)}: run as root or grant "
        + " + ".join(_CAP_NAMES[c] for c in needed)
    )


# --------------------------------------------------------------------------------------------
# Summary and backend choice
# --------------------------------------------------------------------------------------------
class Backend(enum.Enum):
    """How accept() and the application's close() are seen; values match CW_BACKEND_*."""

    TRACEPOINT = 1
    KPROBE = 2
    FENTRY = 3

    @property
    def label(self) -> str:
        return self.name.lower()


_PREFERENCE = (Backend.KPROBE, Backend.FENTRY, Backend.TRACEPOINT)


@dataclass(frozen=True)
class KernelFeatures:
    release: str
    tracefs: Path | None
    #: Present tracepoints among PROBED_TRACEPOINTS, as "category:name".
    tracepoints: frozenset[str]
    kprobes: bool
    fentry: bool
    btf: bool
    inet_csk_accept_args: int | None
    privileged: bool
    privileges: str = ""
    fentry_detail: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def has(self, tracepoint: str) -> bool:
        return tracepoint in self.tracepoints


def lift_memlock_limit() -> None:
    """Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK, summed over all the
    processes of a user: with another BPF tool of root's running, even the fentry probe's
    program is refused (EPERM), and the backend with it. Lift the limit before the first
    probe, as BCC does when it loads; without CAP_SYS_RESOURCE, up to the hard limit (a
    service's LimitMEMLOCK=infinity); past that, the refusal says EPERM."""
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    for limit in ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, limit)
            return
        except (ValueError, OSError):
            continue


def probe_features() -> KernelFeatures:
    """Probe the running kernel.  Does not mount anything: call ensure_tracefs() first."""
    lift_memlock_limit()
    root = tracefs_root()
    present = frozenset(
        tp for tp in PROBED_TRACEPOINTS if root is not None and has_tracepoint(*_split_tracepoint(tp), root=root)
    )
    notes: list[str] = []
    has_btf = btf_available()
    accept_args: int | None = None
    if has_btf:
        try:
            accept_args = _btf.func_arg_count("inet_csk_accept")
        except TracingUnavailableError as e:
            notes.append(str(e))
            has_btf = False
    fentry_ok, fentry_detail = fentry_probe("tcp_close") if has_btf else (False, "no kernel BTF")
    priv, priv_detail = is_privileged()
    return KernelFeatures(
        release=os.uname().release,
        tracefs=root,
        tracepoints=present,
        kprobes=kprobes_available(tracefs=root),
        fentry=fentry_ok,
        btf=has_btf,
        inet_csk_accept_args=accept_args,
        privileged=priv,
        privileges=priv_detail,
        fentry_detail=fentry_detail,
        notes=tuple(notes),
    )


def _missing(f: KernelFeatures, tps: Iterable[str]) -> list[str]:
    return [tp for tp in tps if not f.has(tp)]


def backend_status(f: KernelFeatures) -> dict[Backend, tuple[bool, str]]:
    """For each backend: (usable, one human sentence saying why or why not)."""
    status: dict[Backend, tuple[bool, str]] = {}
    if f.kprobes:
        status[Backend.KPROBE] = (True, "kprobes: available")
    else:
        status[Backend.KPROBE] = (
            False,
            "kprobes: not available (CONFIG_KPROBES off?): no kprobe PMU in "
            "/sys/bus/event_source/devices and no kprobe_events in tracefs",
        )
    if not f.btf:
        status[Backend.FENTRY] = (False, "fentry: not available (the kernel exposes no BTF)")
    elif not f.fentry:
        detail = f" ({f.fentry_detail})" if f.fentry_detail else ""
        status[Backend.FENTRY] = (False, f"fentry: not available{detail}")
    elif f.inet_csk_accept_args is None:
        status[Backend.FENTRY] = (False, "fentry: not available (inet_csk_accept is not in the kernel BTF)")
    else:
        status[Backend.FENTRY] = (
            True,
            f"fentry: available (inet_csk_accept takes {f.inet_csk_accept_args} arguments here)",
        )
    missing = _missing(f, ACCEPT_TRACEPOINTS)
    if f.tracefs is None:
        status[Backend.TRACEPOINT] = (False, "tracepoint: not available (tracefs is not mounted)")
    elif missing:
        status[Backend.TRACEPOINT] = (
            False,
            f"tracepoint: not available (missing {', '.join(missing)}; CONFIG_FTRACE_SYSCALLS off?)",
        )
    else:
        status[Backend.TRACEPOINT] = (True, "tracepoint: available")
    return status


def backend_reasons(f: KernelFeatures) -> list[str]:
    """Human sentences: the required tracepoint, then every backend in preference order."""
    reasons = [
        f"{REQUIRED_TRACEPOINT}: present"
        if f.has(REQUIRED_TRACEPOINT)
        else f"{REQUIRED_TRACEPOINT}: missing (needs Linux 4.16+ and a mounted tracefs)"
    ]
    status = backend_status(f)
    reasons.extend(status[b][1] for b in _PREFERENCE)
    return reasons


def _parse_backend(forced: str) -> Backend:
    key = forced.strip().lower()
    aliases = {"tracepoints": "tracepoint", "tp": "tracepoint", "kprobes": "kprobe", "fexit": "fentry"}
    key = aliases.get(key, key)
    for b in Backend:
        if b.label == key:
            return b
    raise UsageError(
        f"unknown backend {forced!r}: choose one of {', '.join(b.label for b in _PREFERENCE)} (or auto)"
    )


def choose_backend(f: KernelFeatures, forced: str | None) -> Backend:
    """The backend to use: ``forced`` if given (None or "auto" = choose), else the first
    available of kprobe > fentry > tracepoint.  The reasons are in ``backend_reasons(f)``.

    Raises TracingUnavailableError when sock:inet_sock_set_state is missing (every backend
    needs it), when the forced backend is unavailable, or when none is; UsageError for an
    unknown backend name.
    """
    want = None if forced is None or forced.strip().lower() in ("", "auto") else _parse_backend(forced)
    if not f.has(REQUIRED_TRACEPOINT):
        where = f" under {f.tracefs}" if f.tracefs else " (tracefs is not mounted)"
        raise TracingUnavailableError(
            f"tracepoint {REQUIRED_TRACEPOINT} not found{where}: every backend needs it "
            "(Linux 4.16 or newer)"
        )
    status = backend_status(f)
    if want is not None:
        ok, why = status[want]
        if not ok:
            raise TracingUnavailableError(f"backend {want.label} was asked for but is not usable here: {why}")
        return want
    for b in _PREFERENCE:
        if status[b][0]:
            return b
    raise TracingUnavailableError(
        "no tracing backend is usable: " + "; ".join(status[b][1] for b in _PREFERENCE)
    )


# --------------------------------------------------------------------------------------------
# What each part needs, and whether this machine has it (``closewait-trace doctor``)
# --------------------------------------------------------------------------------------------
BPF_MAP_CREATE = 0
BPF_MAP_TYPE_RINGBUF = 27
KALLSYMS = Path("/proc/kallsyms")


class BpfMapCreateAttr(ctypes.Structure):
    """``union bpf_attr``, the head of the BPF_MAP_CREATE member (the kernel zero-fills the rest)."""

    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("map_type", "key_size", "value_size", "max_entries", "map_flags")
    ]


def ringbuf_probe() -> tuple[bool | None, str]:
    """Create (and close) a one-page BPF ring buffer map: (True/False, or None if unknown; why)."""
    attr = BpfMapCreateAttr()
    attr.map_type = BPF_MAP_TYPE_RINGBUF
    attr.max_entries = os.sysconf("SC_PAGE_SIZE")
    try:
        fd = _bpf_syscall(BPF_MAP_CREATE, attr)
    except OSError as e:
        if e.errno == errno.EINVAL:  # an unknown map type
            return False, f"BPF_MAP_TYPE_RINGBUF refused: {_errno_name(e)}"
        return None, f"could not tell: creating a ring buffer map failed with {_errno_name(e)}"
    os.close(fd)
    return True, "a ring buffer map was created"


class EventPath(enum.Enum):
    """How events reach userspace: the compile-time choice of the event output."""

    RING_BUFFER = "ring buffer"
    PERF_BUFFER = "perf buffer"


#: A testing aid: the perf buffer even where the kernel has ring buffers, so that the
#: fallback runs on the kernels we have.
FORCE_PERF_ENV = "CLOSEWAIT_FORCE_PERF_BUFFER"
#: A testing aid: pages per CPU of the perf buffer (a power of two), to provoke losses.
PERF_PAGES_ENV = "CLOSEWAIT_PERF_BUFFER_PAGES"
PERF_PAGES_DEFAULT = 64


@dataclass(frozen=True)
class EventChoice:
    path: EventPath
    perf_pages: int
    notice: str | None  # what to tell the user about the choice (None: the usual ring buffer)


def choose_event_path(ringbuf: tuple[bool | None, str], env: Mapping[str, str]) -> EventChoice:
    """The event output for this kernel (pure: ``ringbuf`` is :func:`ringbuf_probe`'s answer).

    The ring buffer where the kernel has one or where that could not be told (loading then
    says); the perf buffer where the kernel refused a ring buffer map, or when forced."""
    pages = _perf_pages(env.get(PERF_PAGES_ENV, ""))
    size = f"{pages} pages per CPU"
    if env.get(FORCE_PERF_ENV, "") not in ("", "0"):
        return EventChoice(EventPath.PERF_BUFFER, pages,
                           f"{FORCE_PERF_ENV}={env[FORCE_PERF_ENV]}: events through a perf buffer"
                           f" ({size}) although the kernel may have ring buffers")
    if ringbuf[0] is False:
        return EventChoice(EventPath.PERF_BUFFER, pages,
                           f"no BPF ring buffer on this kernel ({ringbuf[1]}): events through a"
                           f" perf buffer ({size})")
    return EventChoice(EventPath.RING_BUFFER, pages, None)


def _perf_pages(text: str) -> int:
    if not text:
        return PERF_PAGES_DEFAULT
    try:
        pages = int(text)
    except ValueError:
        pages = 0
    if pages < 1 or pages & (pages - 1):
        raise UsageError(f"{PERF_PAGES_ENV}={text}: a power of two is needed (pages per CPU)")
    return pages


def kernel_symbol(name: str, *, kallsyms: Path = KALLSYMS) -> bool | None:
    """Whether the kernel has function ``name`` (/proc/kallsyms); None when unreadable or hidden."""
    try:
        with open(kallsyms, encoding="ascii", errors="replace") as f:
            hidden = True
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == name:
                    return True
                if hidden and not line.startswith("0000000000000000"):
                    hidden = False
    except OSError:
        return None
    return None if hidden else False


def bcc_version() -> str | None:
    """BCC's version from its Python module (without loading libbcc), None when absent."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        try:
            text = (Path(d) / "version.py").read_text()
        except OSError:
            continue
        m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
        if m:
            return m.group(1)
    return "unknown version"


@dataclass(frozen=True)
class Requirement:
    """One thing closewait-trace needs, since which kernel, and whether it is here."""

    name: str  # "BPF ring buffer", "kprobe backend"
    used_by: str  # "every backend", "the kprobe backend"
    needs: str  # "Linux 5.8+"
    met: bool | None  # None: could not tell
    detail: str  # what was seen on this machine
    required: bool = False  # tracing is impossible without it (not just one backend)


def requirement_rows(
    f: KernelFeatures,
    *,
    bcc: str | None,
    ringbuf: tuple[bool | None, str],
    probe_read_kernel: bool | None,
) -> list[Requirement]:
    """The rows of :func:`requirements` from probed facts (pure: no probing here)."""
    status = {b: (ok, why.partition(": ")[2]) for b, (ok, why) in backend_status(f).items()}
    tp = f.has(REQUIRED_TRACEPOINT)
    read = {True: "bpf_probe_read_kernel is in the kernel", False: "bpf_probe_read_kernel is not in the kernel",
            None: "could not tell (/proc/kallsyms unreadable or hidden)"}[probe_read_kernel]
    return [
        Requirement("BCC", "compiling the programs",
                    "python3-bpfcc; proven with 0.26 (Debian 12) and 0.31 (Debian 13)",
                    bcc is not None, f"BCC {bcc}" if bcc else "the bcc Python module is not importable", required=True),
        Requirement(REQUIRED_TRACEPOINT, "every backend", "Linux 4.16+", tp,
                    "present" if tp else "missing" + ("" if f.tracefs else " (tracefs not mounted)"), required=True),
        Requirement("bpf_probe_read_kernel/_user", "every backend", "Linux 5.5+", probe_read_kernel, read, required=True),
        Requirement("BPF ring buffer", "events (without it: a perf buffer, Linux 4.4+)", "Linux 5.8+",
                    ringbuf[0], ringbuf[1] + ("; events will go through a perf buffer"
                                              if ringbuf[0] is False else "")),
        Requirement("kprobe backend", "kprobe tcp_close, kretprobe inet_csk_accept",
                    "CONFIG_KPROBES", status[Backend.KPROBE][0], status[Backend.KPROBE][1]),
        Requirement("fentry backend", "fentry tcp_close, fexit inet_csk_accept",
                    "Linux 5.5+ with BTF (CONFIG_DEBUG_INFO_BTF) and BPF trampolines",
                    status[Backend.FENTRY][0], status[Backend.FENTRY][1]),
        Requirement("tracepoint backend", "syscalls:sys_{enter,exit}_accept4",
                    "CONFIG_FTRACE_SYSCALLS", status[Backend.TRACEPOINT][0], status[Backend.TRACEPOINT][1]),
    ]


def requirements(f: KernelFeatures | None = None) -> list[Requirement]:
    """BCC's version and each kernel need of the tracer and its backends, checked here.

    The kernel versions are those of the upstream features (ring buffer 5.8, fentry 5.5,
    bpf_probe_read_kernel 5.5, sock:inet_sock_set_state 4.16); what is *met* is probed on the
    running kernel, not inferred from its version (distributions backport)."""
    feats = f if f is not None else probe_features()
    return requirement_rows(feats, bcc=bcc_version(), ringbuf=ringbuf_probe(),
                            probe_read_kernel=kernel_symbol("bpf_probe_read_kernel"))
