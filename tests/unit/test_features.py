"""Kernel-free tests of closewait_trace.kernel.features: backend choice, privileges, tracefs handling."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
from pathlib import Path

import pytest

from closewait_trace.kernel import features as F
from closewait_trace.errors import TracingUnavailableError, UsageError
from closewait_trace.kernel.features import Backend, KernelFeatures, choose_backend

ALL_TPS = frozenset(F.PROBED_TRACEPOINTS)


def feats(**kw: object) -> KernelFeatures:
    base = KernelFeatures(
        release="6.18.0-test",
        tracefs=Path("/sys/kernel/tracing"),
        tracepoints=ALL_TPS,
        kprobes=True,
        fentry=True,
        btf=True,
        inet_csk_accept_args=2,
        privileged=True,
        privileges="running as root",
        fentry_detail="ok",
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


# --- choose_backend ---------------------------------------------------------------------------
def test_backend_values_match_closewait_h() -> None:
    assert (Backend.TRACEPOINT.value, Backend.KPROBE.value, Backend.FENTRY.value) == (1, 2, 3)
    header = Path(__file__).resolve().parents[2] / "bpf" / "closewait.h"
    if header.exists():
        text = header.read_text()
        for b in Backend:
            assert f"#define CW_BACKEND_{b.name} {b.value}" in text


@pytest.mark.parametrize(
    "kprobes, fentry, accept_tps, expected",
    [
        (True, True, True, Backend.KPROBE),
        (True, False, False, Backend.KPROBE),
        (False, True, True, Backend.FENTRY),
        (False, True, False, Backend.FENTRY),
        (False, False, True, Backend.TRACEPOINT),
    ],
)
def test_preference_kprobe_fentry_tracepoint(kprobes: bool, fentry: bool, accept_tps: bool, expected: Backend) -> None:
    tps = ALL_TPS if accept_tps else frozenset({F.REQUIRED_TRACEPOINT})
    assert choose_backend(feats(kprobes=kprobes, fentry=fentry, tracepoints=tps), None) is expected


def test_auto_is_the_same_as_none() -> None:
    f = feats(kprobes=False)
    assert choose_backend(f, "auto") is choose_backend(f, None) is Backend.FENTRY


@pytest.mark.parametrize("name, backend", [("kprobe", Backend.KPROBE), ("FENTRY", Backend.FENTRY), ("tracepoint", Backend.TRACEPOINT)])
def test_forced_available(name: str, backend: Backend) -> None:
    assert choose_backend(feats(), name) is backend


def test_forced_kprobe_unavailable() -> None:
    with pytest.raises(TracingUnavailableError, match="kprobe.*CONFIG_KPROBES"):
        choose_backend(feats(kprobes=False), "kprobe")


def test_forced_fentry_unavailable_names_the_errno() -> None:
    f = feats(fentry=False, fentry_detail="BPF_PROG_LOAD ... failed: EPERM (Operation not permitted)")
    with pytest.raises(TracingUnavailableError, match="fentry.*EPERM"):
        choose_backend(f, "fentry")


def test_forced_fentry_needs_inet_csk_accept_in_btf() -> None:
    with pytest.raises(TracingUnavailableError, match="inet_csk_accept"):
        choose_backend(feats(inet_csk_accept_args=None), "fentry")


def test_fentry_needs_btf() -> None:
    f = feats(kprobes=False, btf=False)
    with pytest.raises(TracingUnavailableError, match="BTF"):
        choose_backend(f, "fentry")
    assert choose_backend(f, None) is Backend.TRACEPOINT


def test_forced_tracepoint_without_syscall_tracepoints() -> None:
    f = feats(tracepoints=frozenset({F.REQUIRED_TRACEPOINT, "syscalls:sys_enter_accept4"}))
    with pytest.raises(TracingUnavailableError, match="sys_exit_accept4"):
        choose_backend(f, "tracepoint")


def test_nothing_usable() -> None:
    f = feats(kprobes=False, fentry=False, tracepoints=frozenset({F.REQUIRED_TRACEPOINT}))
    with pytest.raises(TracingUnavailableError, match="no tracing backend"):
        choose_backend(f, None)


@pytest.mark.parametrize("forced", [None, "kprobe", "fentry", "tracepoint"])
def test_missing_inet_sock_set_state_fails_every_backend(forced: str | None) -> None:
    f = feats(tracepoints=ALL_TPS - {F.REQUIRED_TRACEPOINT})
    with pytest.raises(TracingUnavailableError, match="sock:inet_sock_set_state"):
        choose_backend(f, forced)


def test_no_tracefs() -> None:
    with pytest.raises(TracingUnavailableError, match="tracefs is not mounted"):
        choose_backend(feats(tracefs=None, tracepoints=frozenset()), None)


def test_unknown_backend_name() -> None:
    with pytest.raises(UsageError, match="unknown backend"):
        choose_backend(feats(), "uprobe")


def test_reasons_cover_every_backend() -> None:
    reasons = F.backend_reasons(feats(kprobes=False, fentry=False, fentry_detail="EPERM"))
    assert reasons[0] == "sock:inet_sock_set_state: present"
    assert reasons[1].startswith("kprobes: not available (CONFIG_KPROBES off?)")
    assert reasons[2].startswith("fentry: not available") and "EPERM" in reasons[2]
    assert reasons[3] == "tracepoint: available"
    assert F.backend_reasons(feats())[1:] == [
        "kprobes: available",
        "fentry: available (inet_csk_accept takes 2 arguments here)",
        "tracepoint: available",
    ]


# --- privileges -------------------------------------------------------------------------------
def status(cap_eff: int) -> str:
    return f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff:016x}\n"


def test_root_is_privileged() -> None:
    assert F.is_privileged(euid=0, status_text="") == (True, "running as root")


def test_all_three_caps() -> None:
    caps = (1 << F.CAP_BPF) | (1 << F.CAP_PERFMON) | (1 << F.CAP_SYS_ADMIN)
    ok, why = F.is_privileged(euid=1000, status_text=status(caps), cap_last_cap=40)
    assert ok and "CAP_BPF" in why


def test_missing_caps_are_named() -> None:
    ok, why = F.is_privileged(euid=1000, status_text=status(1 << F.CAP_SYS_ADMIN), cap_last_cap=40)
    assert not ok
    assert "CAP_BPF" in why and "CAP_PERFMON" in why and "missing CAP_SYS_ADMIN" not in why


def test_no_caps() -> None:
    ok, why = F.is_privileged(euid=1000, status_text=status(0), cap_last_cap=40)
    assert not ok and "CAP_SYS_ADMIN" in why


def test_old_kernel_only_needs_sys_admin() -> None:
    ok, _ = F.is_privileged(euid=1000, status_text=status(1 << F.CAP_SYS_ADMIN), cap_last_cap=37)
    assert ok


def test_unreadable_status() -> None:
    ok, why = F.is_privileged(euid=1000, status_text="garbage")
    assert not ok and "could not be read" in why


# --- tracefs ----------------------------------------------------------------------------------
def fake_sys(tmp_path: Path) -> Path:
    sk = tmp_path / "sys" / "kernel"
    (sk / "debug").mkdir(parents=True)
    (sk / "tracing").mkdir()
    return sk


def add_tracefs(root: Path, tracepoints: tuple[str, ...] = ("sock:inet_sock_set_state",)) -> None:
    (root / "events").mkdir(parents=True, exist_ok=True)
    for tp in tracepoints:
        cat, name = tp.split(":")
        d = root / "events" / cat / name
        d.mkdir(parents=True)
        (d / "format").write_text("name: x\n")


class FakeMounter:
    def __init__(self, automount: bool = True, fail: int | None = None) -> None:
        self.calls: list[tuple[str, Path]] = []
        self.automount = automount
        self.fail = fail

    def __call__(self, fstype: str, target: Path) -> None:
        self.calls.append((fstype, target))
        if self.fail is not None:
            raise OSError(self.fail, "Operation not permitted")
        if fstype == "debugfs":
            (target / "bdi").mkdir()
            if self.automount:
                add_tracefs(target / "tracing")
            else:
                (target / "tracing").mkdir()
        elif fstype == "tracefs":
            add_tracefs(target)


def test_ensure_tracefs_fresh_machine(tmp_path: Path) -> None:
    sk = fake_sys(tmp_path)
    m = FakeMounter()
    notices = F.ensure_tracefs(sys_kernel=sk, mounter=m)
    assert m.calls == [("debugfs", sk / "debug")]
    assert len(notices) == 1 and "debugfs" in notices[0]
    assert F.tracefs_root(sys_kernel=sk) == sk / "debug" / "tracing"


def test_ensure_tracefs_without_automount(tmp_path: Path) -> None:
    sk = fake_sys(tmp_path)
    m = FakeMounter(automount=False)
    notices = F.ensure_tracefs(sys_kernel=sk, mounter=m)
    assert m.calls == [("debugfs", sk / "debug"), ("tracefs", sk / "tracing"), ("tracefs", sk / "debug" / "tracing")]
    assert len(notices) == 3
    assert F.tracefs_root(sys_kernel=sk) == sk / "tracing"


def test_ensure_tracefs_nothing_to_do(tmp_path: Path) -> None:
    sk = fake_sys(tmp_path)
    (sk / "debug" / "bdi").mkdir()
    add_tracefs(sk / "debug" / "tracing")
    add_tracefs(sk / "tracing")
    m = FakeMounter()
    assert F.ensure_tracefs(sys_kernel=sk, mounter=m) == []
    assert m.calls == []


def test_ensure_tracefs_mount_fails(tmp_path: Path) -> None:
    sk = fake_sys(tmp_path)
    with pytest.raises(TracingUnavailableError, match=r"cannot mount debugfs.*mount -t debugfs debugfs"):
        F.ensure_tracefs(sys_kernel=sk, mounter=FakeMounter(fail=errno.EPERM))


def test_ensure_tracefs_no_tracing_dirs(tmp_path: Path) -> None:
    sk = tmp_path / "sys" / "kernel"
    sk.mkdir(parents=True)
    with pytest.raises(TracingUnavailableError, match="CONFIG_TRACING"):
        F.ensure_tracefs(sys_kernel=sk, mounter=FakeMounter())


def test_tracefs_root_none(tmp_path: Path) -> None:
    assert F.tracefs_root(sys_kernel=fake_sys(tmp_path)) is None


def test_has_tracepoint(tmp_path: Path) -> None:
    root = tmp_path / "tracing"
    add_tracefs(root, ("sock:inet_sock_set_state", "syscalls:sys_enter_accept4"))
    assert F.has_tracepoint("sock", "inet_sock_set_state", root=root)
    assert F.has_tracepoint("syscalls", "sys_enter_accept4", root=root)
    assert not F.has_tracepoint("syscalls", "sys_exit_accept4", root=root)
    assert not F.has_tracepoint("sock", "", root=root)


def test_kprobes_available(tmp_path: Path) -> None:
    pmu = tmp_path / "kprobe" / "type"
    root = tmp_path / "tracing"
    root.mkdir()
    assert F.kprobes_available(pmu_type=pmu, tracefs=root) is False
    (root / "kprobe_events").write_text("")
    assert F.kprobes_available(pmu_type=pmu, tracefs=root) is True
    (root / "kprobe_events").unlink()
    pmu.parent.mkdir()
    pmu.write_text("6\n")
    assert F.kprobes_available(pmu_type=pmu, tracefs=root) is True


# --- fentry probe (no syscall made in these) ------------------------------------------------
def test_fentry_probe_without_btf(tmp_path: Path) -> None:
    ok, why = F.fentry_probe("tcp_close", btf_path=tmp_path / "none")
    assert not ok and "no BTF" in why


def test_btf_available(tmp_path: Path) -> None:
    p = tmp_path / "vmlinux"
    assert not F.btf_available(p)
    p.write_bytes(b"\x9f\xeb\x01\x00")
    assert F.btf_available(p)
    p.write_bytes(b"ELF")
    assert not F.btf_available(p)


def test_bpf_attr_layout() -> None:
    # Offsets of union bpf_attr's BPF_PROG_LOAD member (include/uapi/linux/bpf.h).
    expected = {
        "prog_type": 0,
        "insn_cnt": 4,
        "insns": 8,
        "license": 16,
        "log_level": 24,
        "log_size": 28,
        "log_buf": 32,
        "kern_version": 40,
        "prog_flags": 44,
        "prog_name": 48,
        "prog_ifindex": 64,
        "expected_attach_type": 68,
        "prog_btf_fd": 72,
        "func_info_rec_size": 76,
        "func_info": 80,
        "func_info_cnt": 88,
        "line_info_rec_size": 92,
        "line_info": 96,
        "line_info_cnt": 104,
        "attach_btf_id": 108,
        "attach_btf_obj_fd": 112,
        "core_relo_cnt": 116,
        "fd_array": 120,
        "core_relos": 128,
        "core_relo_rec_size": 136,
    }
    for name, off in expected.items():
        assert getattr(F.BpfProgLoadAttr, name).offset == off, name
    assert ctypes.sizeof(F.BpfProgLoadAttr) == 144
    raw = {"name": 0, "prog_fd": 8, "_pad": 12, "cookie": 16}
    assert {n: getattr(F.BpfRawTracepointAttr, n).offset for n in raw} == raw
    assert ctypes.sizeof(F.BpfRawTracepointAttr) == 24
    link = {"prog_fd": 0, "target_fd": 4, "attach_type": 8, "flags": 12, "target_btf_id": 16,
            "_pad": 20, "cookie": 24}
    assert {n: getattr(F.BpfLinkCreateAttr, n).offset for n in link} == link
    assert ctypes.sizeof(F.BpfLinkCreateAttr) == 32
    assert (F.BPF_PROG_LOAD, F.BPF_RAW_TRACEPOINT_OPEN, F.BPF_LINK_CREATE) == (5, 17, 28)
    assert (F.BPF_PROG_TYPE_TRACING, F.BPF_TRACE_FENTRY) == (26, 24)


def test_bpf_constants_match_uapi_header_if_installed() -> None:
    headers = sorted(Path("/usr/src").glob("linux-headers-*/include/uapi/linux/bpf.h"))
    if not headers:
        pytest.skip("no uapi bpf.h installed")
    text = headers[-1].read_text()

    def index_in_enum(enum_name: str, member: str) -> int:
        body = text.split(f"enum {enum_name} {{", 1)[1].split("};", 1)[0]
        names = []
        for line in body.splitlines():
            tok = line.strip().split("/*")[0].strip().rstrip(",")
            if tok and "=" not in tok and tok.isidentifier():
                names.append(tok)
        return names.index(member)

    assert index_in_enum("bpf_cmd", "BPF_PROG_LOAD") == F.BPF_PROG_LOAD
    assert index_in_enum("bpf_cmd", "BPF_RAW_TRACEPOINT_OPEN") == F.BPF_RAW_TRACEPOINT_OPEN
    assert index_in_enum("bpf_cmd", "BPF_LINK_CREATE") == F.BPF_LINK_CREATE
    assert index_in_enum("bpf_prog_type", "BPF_PROG_TYPE_TRACING") == F.BPF_PROG_TYPE_TRACING
    assert index_in_enum("bpf_attach_type", "BPF_TRACE_FENTRY") == F.BPF_TRACE_FENTRY


def test_ret0_program_encoding() -> None:
    prog = F._RET0_PROG
    assert len(prog) == 16
    assert prog[0] == 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
    assert prog[8] == 0x95  # BPF_JMP | BPF_EXIT


# --- requirements (doctor) --------------------------------------------------------------------
def rows(f: KernelFeatures, **kw: object) -> dict[str, F.Requirement]:
    args: dict[str, object] = {"bcc": "0.26.0", "ringbuf": (True, "created"), "probe_read_kernel": True}
    args.update(kw)
    return {r.name: r for r in F.requirement_rows(f, **args)}  # type: ignore[arg-type]


def test_requirements_name_each_kernel_need() -> None:
    r = rows(feats())
    assert [(x.name, x.needs) for x in r.values()] == [
        ("BCC", "python3-bpfcc; proven with 0.26 (Debian 12) and 0.31 (Debian 13)"),
        ("sock:inet_sock_set_state", "Linux 4.16+"),
        ("bpf_probe_read_kernel/_user", "Linux 5.5+"),
        ("BPF ring buffer", "Linux 5.8+"),
        ("kprobe backend", "CONFIG_KPROBES"),
        ("fentry backend", "Linux 5.5+ with BTF (CONFIG_DEBUG_INFO_BTF) and BPF trampolines"),
        ("tracepoint backend", "CONFIG_FTRACE_SYSCALLS"),
    ]
    assert all(x.met for x in r.values())
    assert r["BCC"].detail == "BCC 0.26.0"
    # without a ring buffer, events go through a perf buffer (choose_event_path)
    assert [x.name for x in r.values() if x.required] == [
        "BCC", "sock:inet_sock_set_state", "bpf_probe_read_kernel/_user"]
    assert "perf buffer" in r["BPF ring buffer"].used_by


def test_requirements_unmet_and_unknown() -> None:
    """A 5.4-like kernel without kprobes: what is missing is said, not inferred from a version."""
    r = rows(feats(kprobes=False, btf=False, tracepoints=frozenset()), bcc=None,
             ringbuf=(False, "BPF_MAP_TYPE_RINGBUF refused: EINVAL"), probe_read_kernel=None)
    assert r["BCC"].met is False and "not importable" in r["BCC"].detail
    assert r["sock:inet_sock_set_state"].met is False
    assert r["bpf_probe_read_kernel/_user"].met is None and "could not tell" in r["bpf_probe_read_kernel/_user"].detail
    assert r["BPF ring buffer"].met is False and "EINVAL" in r["BPF ring buffer"].detail
    assert r["BPF ring buffer"].detail.endswith("events will go through a perf buffer")
    assert r["kprobe backend"].met is False and r["kprobe backend"].detail.startswith("not available (CONFIG_KPROBES")
    assert r["fentry backend"].met is False and "BTF" in r["fentry backend"].detail
    assert r["tracepoint backend"].met is False


def test_kernel_symbol(tmp_path: Path) -> None:
    ks = tmp_path / "kallsyms"
    ks.write_text("ffffffff81000000 T _stext\nffffffff8120d5a0 t bpf_probe_read_kernel\n")
    assert F.kernel_symbol("bpf_probe_read_kernel", kallsyms=ks) is True
    assert F.kernel_symbol("bpf_probe_read_user", kallsyms=ks) is False
    ks.write_text("0000000000000000 T _stext\n0000000000000000 t other\n")  # kptr_restrict: hidden
    assert F.kernel_symbol("bpf_probe_read_kernel", kallsyms=ks) is None
    assert F.kernel_symbol("x", kallsyms=tmp_path / "missing") is None


def test_bcc_version_of_an_importable_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "bcc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('not loaded by bcc_version')\n")
    (pkg / "version.py").write_text("__version__ = '0.31.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "bcc", raising=False)
    assert F.bcc_version() == "0.31.0"


def test_memlock_is_lifted_before_the_first_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 5.11 a BPF program is charged to RLIMIT_MEMLOCK, summed over root's processes:
    the fentry probe must run with the limit lifted (5.10 refused it with EPERM while another
    tracer ran)."""
    from closewait_trace.kernel import features as f

    calls: list[tuple[int, tuple[int, int]]] = []
    monkeypatch.setattr(f.resource, "setrlimit", lambda which, lim: calls.append((which, lim)))

    def fake_fentry_probe(func: str = "tcp_close") -> tuple[bool, str]:
        assert calls == [(f.resource.RLIMIT_MEMLOCK,
                          (f.resource.RLIM_INFINITY, f.resource.RLIM_INFINITY))]
        return True, "probed"

    monkeypatch.setattr(f, "btf_available", lambda *a, **k: True)
    monkeypatch.setattr(f._btf, "func_arg_count", lambda name: 4)
    monkeypatch.setattr(f, "fentry_probe", fake_fentry_probe)
    assert f.probe_features().fentry


def test_without_the_capability_memlock_goes_up_to_the_hard_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from closewait_trace.kernel import features as f

    tried: list[tuple[int, int]] = []

    def only_up_to_hard(which: int, lim: tuple[int, int]) -> None:
        tried.append(lim)
        if lim[1] != 8 << 20:
            raise ValueError("not allowed to raise maximum limit")

    monkeypatch.setattr(f.resource, "getrlimit", lambda which: (64 << 10, 8 << 20))
    monkeypatch.setattr(f.resource, "setrlimit", only_up_to_hard)
    f.lift_memlock_limit()
    assert tried == [(f.resource.RLIM_INFINITY, f.resource.RLIM_INFINITY), (8 << 20, 8 << 20)]

    def refuse(which: int, lim: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(f.resource, "setrlimit", refuse)
    f.lift_memlock_limit()  # no exception: the BPF refusal will say EPERM instead
