"""Attach stage: compile the BPF programs with BCC, load them, attach them, read their maps.

BCC comes from the distribution (python3-bpfcc), not from PyPI: import_bcc() finds it where
the distribution puts it even from a virtual environment that does not see system packages.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import importlib
import importlib.util
import mmap
import os
import re
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from . import decode
from .bpfdir import bpf_source_dir
from .decode import CConfig, CListener, CListenerKey, CSock, SockInfo, Stat
from ..errors import BccMissingError, BpfLoadError, KernelHeadersError, PrivilegeError
from .features import Backend, EventPath, choose_event_path, ringbuf_probe, tracefs_root
from .headers import HeaderCandidate
from .kfields import CLASSIC_TRACEPOINT_ENV, KernelFields, resolve_kernel_fields
from .release import release_compiler_memory
from .skips import SkipCounter, misses_by_program
from ..facts.netns import own_netns_inode
from ..options import DEFAULT_MAX_CW, DEFAULT_MAX_SOCKS, DEFAULT_REPORT_MIN_NS

#: Where Debian and Ubuntu install BCC's Python module (python3-bpfcc).
DISTRO_BCC_DIRS = (
    Path("/usr/lib/python3/dist-packages"),
    Path("/usr/lib/python3/site-packages"),
    Path("/usr/share/bcc/python"),
)

BCC_INSTALL_HINT = (
    "BCC is not installed: run `make setup`, or `apt-get install python3-bpfcc bpfcc-tools`"
    " (Debian/Ubuntu); PyPI's 'bcc' is an unrelated project"
)


def import_bcc() -> ModuleType:
    """The bcc module, from the environment or from the distribution's directory."""
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for base in DISTRO_BCC_DIRS:
        init = base / "bcc" / "__init__.py"
        if not init.is_file():
            continue
        spec = importlib.util.spec_from_file_location(
            "bcc", init, submodule_search_locations=[str(base / "bcc")]
        )
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["bcc"] = module
        try:
            spec.loader.exec_module(module)
        except (ImportError, OSError) as exc:
            sys.modules.pop("bcc", None)
            raise BccMissingError(f"{BCC_INSTALL_HINT} (loading {init} failed: {exc})") from exc
        return module
    raise BccMissingError(BCC_INSTALL_HINT)


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"/]+)"[ \t]*$')


def bpf_source(src_dir: Path, name: str = "closewait.bpf.c") -> str:
    """The program as one text: BCC rewrites map operations (``socks.lookup(...)``) only in
    the text it is given, never in the headers that text includes, so every local
    ``#include "x.h"`` of bpf/ is inlined here where it stands (under the preprocessor
    conditionals around it; the headers' include guards keep each one defined once), between
    ``#line`` directives that keep the compiler's messages pointing at the right file and line."""

    def inline(fname: str, stack: tuple[str, ...]) -> list[str]:
        if fname in stack:
            raise BpfLoadError(f"the BPF sources include each other: {' -> '.join((*stack, fname))}")
        try:
            lines = (src_dir / fname).read_text().splitlines()
        except OSError as exc:
            raise BpfLoadError(f"cannot read the BPF source {src_dir / fname}: {exc}") from exc
        out = [f'#line 1 "{fname}"']
        for number, line in enumerate(lines, start=1):
            m = _LOCAL_INCLUDE.match(line)
            if m is None or not (src_dir / m.group(1)).is_file():
                out.append(line)
                continue
            out.extend(inline(m.group(1), (*stack, fname)))
            out.append(f'#line {number + 1} "{fname}"')
        return out

    return "\n".join(inline(name, ())) + "\n"


@dataclass(frozen=True)
class ProbeSettings:
    backend: Backend
    accept_nargs: int | None = None  # fentry: parameters of inet_csk_accept in BTF
    sys_accept4_nargs: int | None = None  # fentry: parameters of __sys_accept4 in BTF
    complete_hashdance: bool = False  # fentry: inet_csk_complete_hashdance is in BTF
    report_min_ns: int = DEFAULT_REPORT_MIN_NS
    pids: frozenset[int] = frozenset()
    ports: frozenset[int] = frozenset()
    #: network namespace inodes that pass --netns (applied in the kernel where it reads them)
    netns: frozenset[int] = frozenset()
    timeline_all: bool = False
    max_socks: int = DEFAULT_MAX_SOCKS
    max_cw: int = DEFAULT_MAX_CW
    max_listeners: int = 4096
    #: pages of the event ring buffer; None: room for an exit of every cw map entry
    ringbuf_pages: int | None = None
    #: the event output; None: chosen at load (features.choose_event_path)
    events: EventPath | None = None
    #: pages per CPU of the perf buffer (EventPath.PERF_BUFFER), a power of two
    perf_pages: int = 64
    #: most cw map entries one owner (uid) may hold; None: default_owner_room(max_cw)
    owner_room: int | None = None
    #: kernel struct offsets for the C; None: resolved from the running kernel's BTF at load
    kernel_fields: KernelFields | None = None

    def cflags(self, src_dir: Path) -> list[str]:
        flags = [
            f"-I{src_dir}",
            f"-DCW_BACKEND={self.backend.value}",
            f"-DCW_MAX_SOCKS={self.max_socks}",
            f"-DCW_MAX_CW={self.max_cw}",
            f"-DCW_MAX_LISTENERS={self.max_listeners}",
            f"-DCW_RINGBUF_PAGES={self.ringbuf_pages or ringbuf_pages_for(self.max_cw)}",
            "-Wno-macro-redefined",
        ]
        if self.pids:
            flags.append("-DCW_FOLLOW_PIDS")
        if self.events is EventPath.PERF_BUFFER:
            flags.append("-DCW_EVENTS_PERF")
        if self.backend is Backend.FENTRY:
            flags.append(f"-DCW_ACCEPT_NARGS={self.accept_nargs or 4}")
            if self.sys_accept4_nargs == 4:
                flags.append("-DCW_HAVE_SYS_ACCEPT4")
            if self.complete_hashdance:
                flags.append("-DCW_HAVE_COMPLETE_HASHDANCE")
        return flags


@contextlib.contextmanager
def _captured_stderr() -> Iterator[IO[bytes]]:
    """Send fd 2 to an unnamed temporary file while BCC compiles: its compiler and verifier
    write there. The file has no name, so nothing is left behind however the run ends."""
    with tempfile.TemporaryFile(prefix="closewait-trace-bcc-") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(log.fileno(), 2)
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _log_tail(log: IO[bytes], lines: int = 3) -> str:
    try:
        log.seek(0)
        text = log.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    useful = [line for line in text if line.strip() and not line.startswith(("In file included", "      "))]
    return " | ".join(useful[-lines:])


def _compile(
    source: str,
    cflags: list[str],
    candidates: list[HeaderCandidate],
    notices: list[str],
    on_compile: Callable[[HeaderCandidate], None] | None,
) -> tuple[Any, HeaderCandidate]:
    """BCC's BPF object from the first header set that compiles the source (notices about the
    choice appended to ``notices``)."""
    bcc = import_bcc()
    if not candidates:
        raise KernelHeadersError(
            "no kernel headers found: install linux-headers-$(uname -r)"
            " (or linux-headers-amd64 on Debian), or pass --kernel-headers DIR"
        )
    failures: list[str] = []
    for cand in candidates:
        if on_compile is not None:
            on_compile(cand)
        os.environ["BCC_KERNEL_SOURCE"] = str(cand.path)
        with _captured_stderr() as log:
            try:
                bpf = bcc.BPF(text=source.encode(), cflags=cflags)
            except Exception as exc:  # BCC raises bare Exception
                msg = str(exc)
                tail = _log_tail(log, 8)
                if "Operation not permitted" in tail:  # map creation refused, not the headers
                    raise PrivilegeError(
                        "the kernel refused to create the BPF maps (Operation not permitted):"
                        " closewait-trace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN),"
                        " and a seccomp profile that allows bpf()") from exc
                if "compile" in msg.lower():
                    failures.append(f"{cand.origin}: {_log_tail(log) or msg}")
                    continue
                raise BpfLoadError(
                    f"loading the BPF programs failed: {msg}; {_log_tail(log, 8)}"
                ) from exc
        if failures:
            notices.append(
                f"kernel headers: compiled with {cand.origin} after "
                f"{len(failures)} header set(s) failed ({failures[0][:160]})"
            )
        elif cand.notice:
            notices.append(cand.notice)
        return bpf, cand
    raise KernelHeadersError(
        "no installed kernel header set compiles the BPF programs: "
        + "; ".join(f[:200] for f in failures)
    )


def _kprobe_profile() -> Path | None:
    root = tracefs_root()
    return root / "kprobe_profile" if root is not None else None


def merge_event_losses(stats: dict[Stat, int], perf_lost: int) -> dict[Stat, int]:
    """The kernel's count of lost events with the perf buffer's lost callback's.

    A full perf buffer is seen twice: bpf_perf_event_output fails (counted in the kernel, at
    once) and the buffer reports the loss to the lost callback (when it next has room for a
    record, so later or, at the end of a run, never). The two count the same losses, so the
    larger is the count (the ring buffer path has only the kernel's, and perf_lost 0)."""
    out = dict(stats)
    out[Stat.RINGBUF_LOST] = max(stats.get(Stat.RINGBUF_LOST, 0), perf_lost)
    return out


def ringbuf_pages_for(max_cw: int) -> int:
    """Pages of the event ring buffer: room for one exit event of every socket the cw map
    can hold, so that a process that dies holding all of them (every exit at once, maybe
    while a tick is busy and nothing drains the ring) loses none. A power of two, as the
    kernel requires; 64 at the least, and at most 64 MiB (a map of over ~340,000 entries
    is covered in part)."""
    need = min(max_cw * (ct.sizeof(decode.CEvent) + 8), RINGBUF_MAX_BYTES)  # 8: record header
    pages = 64
    while pages * mmap.PAGESIZE < need:
        pages *= 2
    return pages


RINGBUF_MAX_BYTES = 64 << 20


def default_owner_room(max_cw: int) -> int:
    """CLOSE_WAIT map entries one owner (uid) may hold: three quarters of the map, so that a
    quarter always stays for the others, and a single-tenant host still sees most of its
    sockets before any is counted as lost."""
    return max_cw - max_cw // 4


@dataclass
class Probes:
    """The loaded programs and their maps."""

    bpf: Any
    settings: ProbeSettings
    header: HeaderCandidate | None
    notices: list[str] = field(default_factory=list)
    #: the struct offsets compiled in, and the features left out for want of them
    kernel_fields: KernelFields = field(default_factory=KernelFields)
    _closed: bool = False
    _batch_ok: bool = True
    #: the accept syscall tracepoints are attached (they tax every syscall: see the C)
    accept_watch: bool = False
    #: the programs act (config.ready): set by arm() once the filters and seeds are written
    armed: bool = False
    #: raw cw map value -> decoded record, from the previous poll: a socket sitting in
    #: CLOSE_WAIT is decoded once, not at every poll
    _decoded: dict[bytes, SockInfo] = field(default_factory=dict)
    #: events the perf buffer reported lost (its lost callback)
    perf_lost: int = 0
    #: runs of the programs the kernel skipped (kernel/skips.py)
    skips: SkipCounter = field(default_factory=lambda: SkipCounter(pid=os.getpid()))

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        settings: ProbeSettings,
        headers: Iterable[HeaderCandidate],
        *,
        on_compile: Callable[[HeaderCandidate], None] | None = None,
    ) -> Probes:
        """Compile against the first header set that works, load, attach, configure."""
        src_dir = bpf_source_dir()
        fields = settings.kernel_fields
        if fields is None:
            fields = resolve_kernel_fields()
        if os.environ.get(CLASSIC_TRACEPOINT_ENV, "") not in ("", "0"):
            fields = fields.without("raw-tracepoint", f"{CLASSIC_TRACEPOINT_ENV}="
                                    f"{os.environ[CLASSIC_TRACEPOINT_ENV]}: the classic tracepoint")
        notices: list[str] = fields.notices()
        if settings.events is None:
            choice = choose_event_path(ringbuf_probe(), os.environ)
            settings = replace(settings, events=choice.path, perf_pages=choice.perf_pages)
            if choice.notice:
                notices.append(choice.notice)
        bpf, chosen = _compile(bpf_source(src_dir), settings.cflags(src_dir) + fields.cflags(),
                               list(headers), notices, on_compile)
        probes = cls(bpf=bpf, settings=settings, header=chosen, notices=notices,
                     kernel_fields=fields)
        try:
            probes._attach()
            # the runs, then the hits: a return in flight counts in the baseline, not as a skip
            probes.skips.set_baseline(probes._kernel_stats(), probes.skips.kretprobes())
            probes._configure()
        except BaseException:
            probes.close()
            raise
        release_compiler_memory()
        return probes

    SYSCALL_ENTERS = (b"syscalls:sys_enter_accept4", b"syscalls:sys_enter_accept")
    SYSCALL_EXITS = (b"syscalls:sys_exit_accept4", b"syscalls:sys_exit_accept")

    def _attach(self) -> None:
        """Tracepoints and fentry/fexit attach themselves when BCC loads; kprobes here.
        accept() outcomes come from __sys_accept4 where the backend can probe it."""
        backend = self.settings.backend
        try:
            if backend is Backend.KPROBE:
                self._attach_kretprobe(b"inet_csk_accept", b"cwt_accept_ret")
                self.bpf.attach_kprobe(event=b"tcp_close", fn_name=b"cwt_tcp_close")
                self._attach_queue_probe()
                if not self._kprobe_if_present(b"__sys_accept4", b"cwt_accept_syscall_ret",
                                               ret=True):
                    self._syscall_fallback()
            elif backend is Backend.FENTRY and self.settings.sys_accept4_nargs != 4:
                self._syscall_fallback()
        except BpfLoadError:
            raise
        except Exception as exc:
            raise BpfLoadError(f"attaching probes failed: {exc}") from exc

    def _attach_queue_probe(self) -> None:
        """kprobe inet_csk_complete_hashdance: the exact listener of each queued child."""
        if not self._kprobe_if_present(b"inet_csk_complete_hashdance",
                                       b"cwt_complete_hashdance"):
            self.notices.append("inet_csk_complete_hashdance cannot be probed on this kernel: a"
                                " never-accepted socket's listener is the best candidate")

    def _kprobe_if_present(self, event: bytes, fn_name: bytes, *, ret: bool = False) -> bool:
        """Attach a kprobe (a kretprobe with ``ret``) where the kernel can probe ``event``;
        False where it cannot (not built, inlined, blacklisted). One attach attempt, not BCC's
        function listing, which matches a regex against every kernel symbol: a quarter of a
        second on a host, 8 s per call under emulation. The program is loaded first, so that
        a verifier refusal stays an error rather than passing for an absent function."""
        bcc = import_bcc()
        self.bpf.load_func(fn_name, bcc.BPF.KPROBE)
        with _captured_stderr():  # BCC prints the failed attach; the notice says it instead
            try:
                if ret:
                    self._attach_kretprobe(event, fn_name)
                else:
                    self.bpf.attach_kprobe(event=event, fn_name=fn_name)
            except Exception:  # BCC raises bare Exception
                return False
        return True

    #: Calls a kretprobe can follow at once (threads blocked in accept() at the same time):
    #: the kernel's default is max(10, 2 x CPUs), and a return past it is dropped silently
    #: (seen: 20 threads blocked in accept() in a 2-CPU guest, 10 accepts missed). 4096 is
    #: the most kprobe_events accepts (KRETPROBE_MAXACTIVE_MAX).
    KRETPROBE_MAXACTIVE = 4096

    def _attach_kretprobe(self, event: bytes, fn_name: bytes) -> None:
        """With room for KRETPROBE_MAXACTIVE calls at once (BCC then creates the probe through
        tracefs' kprobe_events); where that is refused, the kernel's default, said so."""
        try:
            self.bpf.attach_kretprobe(event=event, fn_name=fn_name,
                                      maxactive=self.KRETPROBE_MAXACTIVE)
            self.skips.note_made(event.decode(), _kprobe_profile())
            return
        except Exception:  # BCC raises bare Exception
            pass
        self.bpf.attach_kretprobe(event=event, fn_name=fn_name)
        self.notices.append(f"the kretprobe on {event.decode()} could not be given room for"
                            f" {self.KRETPROBE_MAXACTIVE} calls at once: past the kernel's"
                            " default (10, or 2 per CPU) blocked in it, returns are missed")

    def _syscall_fallback(self) -> None:
        for tp in self.SYSCALL_EXITS:
            self.bpf.attach_tracepoint(tp=tp, fn_name=b"cwt_sys_exit_accept")
        self.notices.append(
            "__sys_accept4 cannot be probed on this kernel: accept() failures are traced"
            " through the syscall tracepoints, which slow every syscall a little")

    def set_accept_watch(self, on: bool, waiting: Collection[int] = ()) -> None:
        """Tracepoint backend: attach or detach the accept syscall tracepoints.

        While they are attached the kernel keeps passive sockets findable by their peer
        address (the pending map), from ESTABLISHED or from CLOSE_WAIT on. Sockets already
        in CLOSE_WAIT when the watch begins are put there from the cw map (the kernel does not
        know of these entries, so they stay until the watch ends) if userspace still believes
        them never accepted (`waiting`: an accept unseen while the watch was detached leaves
        no mark in the kernel); the map is emptied when the watch ends (nothing reads it)."""
        if self.settings.backend is not Backend.TRACEPOINT or on == self.accept_watch \
                or self._closed:
            return
        try:
            if on:
                self._write_config(accept_watch=True)
                # a thread blocked in accept() when the watch last ended left its entry
                self.bpf[b"accept_args"].clear()
                self._seed_pending(set(waiting))
                for tp in self.SYSCALL_ENTERS:
                    self.bpf.attach_tracepoint(tp=tp, fn_name=b"cwt_sys_enter_accept")
                for tp in self.SYSCALL_EXITS:
                    self.bpf.attach_tracepoint(tp=tp, fn_name=b"cwt_sys_exit_accept")
            else:
                for tp in self.SYSCALL_ENTERS + self.SYSCALL_EXITS:
                    self.bpf.detach_tracepoint(tp=tp)
                self._write_config(accept_watch=False)
                self.bpf[b"pending"].clear()
        except Exception as exc:
            raise BpfLoadError(f"attaching the accept syscall tracepoints failed: {exc}") \
                from exc
        self.accept_watch = on

    def _seed_pending(self, waiting: set[int]) -> None:
        """Passive sockets now in CLOSE_WAIT and not accepted, into the pending map."""
        pending = self.bpf[b"pending"]
        for key, raw in self.bpf[b"cw"].items():
            flags = decode.SockFlag(raw.flags)
            if not flags & decode.SockFlag.PASSIVE or flags & decode.SockFlag.ACCEPTED \
                    or key.value not in waiting:
                continue
            peer = pending.Key()
            ct.memmove(ct.addressof(peer.addr), bytes(raw.raddr), decode.ADDR_LEN)
            peer.port = raw.rport
            peer.netns = raw.netns
            pending[peer] = pending.Leaf(key.value)

    def _configure(self) -> None:
        """Filters and settings; the programs stay idle (ready = 0) until arm()."""
        self.set_pids(self.settings.pids)
        self.set_ports(self.settings.ports)
        table = self.bpf[b"netns_filter"]
        for inode in self.settings.netns if self.netns_known else ():
            table[ct.c_uint32(inode)] = ct.c_uint8(1)
        self._write_config(accept_watch=False)

    @property
    def netns_known(self) -> bool:
        """The programs read each socket's network namespace (else every one reads 0)."""
        return "netns" in self.kernel_fields.enabled

    def arm(self) -> None:
        """Let the programs act: written last, after the filters and the seeds, so that no
        event is counted or reported under settings that are not yet in force."""
        if self.armed or self._closed:
            return
        self.armed = True
        self._write_config(accept_watch=self.accept_watch)

    def _write_config(self, *, accept_watch: bool) -> None:
        cfg = CConfig()
        cfg.report_min_ns = self.settings.report_min_ns
        cfg.filter_pids = 1 if self.settings.pids else 0
        cfg.filter_ports = 1 if self.settings.ports else 0
        cfg.filter_netns = 1 if self.settings.netns and self.netns_known else 0
        cfg.timeline_all = 1 if self.settings.timeline_all else 0
        cfg.accept_watch = 1 if accept_watch else 0
        cfg.ready = 1 if self.armed else 0
        room = self.settings.owner_room
        cfg.owner_room = default_owner_room(self.settings.max_cw) if room is None else room
        table = self.bpf[b"config"]
        table[ct.c_int(0)] = table.Leaf.from_buffer_copy(bytes(cfg))

    # --- filters and seeds --------------------------------------------------------------

    def set_pids(self, pids: Iterable[int]) -> None:
        """The PIDs userspace wants traced (the -p PIDs and the descendants it found). The
        kernel's own entries (processes it saw a traced process create) are left to it: it
        adds them at creation and forgets them at exit."""
        if self._closed:
            return
        table = self.bpf[b"pid_filter"]
        wanted = set(pids)
        present: dict[int, int] = {int(k.value): int(v.value) for k, v in table.items()}
        for pid, mark in present.items():
            if mark == decode.PidMark.USER and pid not in wanted:
                del table[ct.c_uint32(pid)]
        for pid in wanted - set(present):
            table[ct.c_uint32(pid)] = ct.c_uint8(decode.PidMark.USER)

    def set_ports(self, ports: Iterable[int]) -> None:
        table = self.bpf[b"port_filter"]
        for port in ports:
            table[ct.c_uint16(port)] = ct.c_uint8(1)

    def seed_listener(self, netns: int | None, port: int, pid: int, comm: str) -> None:
        """A listener that existed before the tracer: its children get this owner. netns:
        its namespace's inode, None for the tracer's own."""
        table = self.bpf[b"listeners"]
        key = CListenerKey()
        key.port = port
        if self.netns_known:
            key.netns = own_netns_inode() if netns is None else netns
        lst = CListener()
        lst.tgid = pid
        lst.comm = comm.encode()[: decode.COMM_LEN - 1]
        table[table.Key.from_buffer_copy(bytes(key))] = table.Leaf.from_buffer_copy(bytes(lst))

    # --- reading ------------------------------------------------------------------------

    def open_events(self, callback: Callable[[decode.Event], None]) -> None:
        def _raw(_ctx: Any, data: Any, size: int) -> None:
            callback(decode.decode_event(ct.string_at(data, size)))

        def _raw_perf(_cpu: int, data: Any, size: int) -> None:
            callback(decode.decode_event(ct.string_at(data, size)))

        def _lost(count: int) -> None:
            self.perf_lost += int(count)

        if self.event_path is EventPath.PERF_BUFFER:
            self.bpf[b"events"].open_perf_buffer(_raw_perf, page_cnt=self.settings.perf_pages,
                                                 lost_cb=_lost)
        else:
            self.bpf[b"events"].open_ring_buffer(_raw)

    def poll_events(self, timeout_ms: int) -> None:
        if self.event_path is EventPath.PERF_BUFFER:
            self.bpf.perf_buffer_poll(timeout_ms)
        else:
            self.bpf.ring_buffer_poll(timeout_ms)

    @property
    def event_path(self) -> EventPath:
        return self.settings.events or EventPath.RING_BUFFER

    def read_cw(self) -> list[SockInfo]:
        """Every entry of the cw map: sockets now in CLOSE_WAIT that passed the filters."""
        table = self.bpf[b"cw"]
        items: Iterable[tuple[Any, Any]]
        if self._batch_ok:
            try:
                items = list(table.items_lookup_batch())
            except Exception:
                self._batch_ok = False  # kernel without batch ops (< 5.6)
                items = list(table.items())
        else:
            items = list(table.items())
        cache = self._decoded
        fresh: dict[bytes, SockInfo] = {}
        out = []
        for _, v in items:
            raw = bytes(v)
            info = cache.get(raw)
            if info is None:
                info = decode.sock_from_c(CSock.from_buffer_copy(raw))
            fresh[raw] = info
            out.append(info)
        self._decoded = fresh
        return out

    def read_stats(self) -> dict[Stat, int]:
        kretprobes = self.skips.kretprobes()  # before the runs: see SkipCounter
        stats = self._kernel_stats()
        misses = misses_by_program({name.decode(): int(f.fd)
                                    for name, f in self.bpf.funcs.items()})
        stats[Stat.KERNEL_SKIPPED] = self.skips.update(stats, kretprobes, misses)
        return merge_event_losses(stats, self.perf_lost)

    def _kernel_stats(self) -> dict[Stat, int]:
        table = self.bpf[b"stats"]
        return {s: int(table.sum(ct.c_int(s.value)).value) for s in Stat}

    def read_hist(self) -> list[int]:
        table = self.bpf[b"cw_hist"]
        return [int(table.sum(ct.c_int(i)).value) for i in range(decode.HIST_BUCKETS)]

    def read_accept_stats(self) -> dict[int, decode.CAcceptStat]:
        table = self.bpf[b"accept_stats"]
        return {
            int(k.value): decode.CAcceptStat.from_buffer_copy(bytes(v)) for k, v in table.items()
        }

    def read_accept_errs(self) -> dict[tuple[int, int], int]:
        table = self.bpf[b"accept_errs"]
        out = {}
        for k, v in table.items():
            key = decode.CAcceptErr.from_buffer_copy(bytes(k))
            out[(int(key.tgid), int(key.err))] = int(v.value)
        return out

    @property
    def closed(self) -> bool:
        """Detached: nothing more to poll or read."""
        return self._closed

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Detach every probe and free the maps (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.bpf.cleanup()
