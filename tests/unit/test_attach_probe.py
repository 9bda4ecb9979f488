"""Optional kprobes: an attach that fails means the function cannot be probed; a program the
verifier refuses is still an error."""

from __future__ import annotations

from typing import Any

import pytest

from closewait_trace.kernel.attach import ProbeSettings, Probes
from closewait_trace.kernel.features import Backend


class FakeBpf:
    """The slice of bcc.BPF that Probes._kprobe_if_present uses."""

    def __init__(self, present: set[bytes], refused: set[bytes] = frozenset(),
                 maxactive_ok: bool = True) -> None:
        self.present = present
        self.refused = refused
        self.maxactive_ok = maxactive_ok
        self.attached: list[tuple[str, bytes, bytes]] = []
        self.maxactive: list[int] = []

    def load_func(self, fn_name: bytes, _prog_type: int) -> object:
        if fn_name in self.refused:
            raise Exception(f"Failed to load BPF program {fn_name!r}: Permission denied")
        return object()

    def _attach(self, kind: str, event: bytes, fn_name: bytes) -> None:
        if event not in self.present:
            raise Exception(f"Failed to attach BPF program {fn_name!r} to {kind} {event!r}")
        self.attached.append((kind, event, fn_name))

    def attach_kprobe(self, *, event: bytes, fn_name: bytes) -> None:
        self._attach("kprobe", event, fn_name)

    def attach_kretprobe(self, *, event: bytes, fn_name: bytes, maxactive: int = 0) -> None:
        if maxactive and not self.maxactive_ok:
            raise Exception("Failed to attach BPF program to kretprobe (kprobe_events)")
        self._attach("kretprobe", event, fn_name)
        self.maxactive.append(maxactive)


def probes(bpf: Any) -> Probes:
    return Probes(bpf=bpf, settings=ProbeSettings(backend=Backend.KPROBE), header=None)


def test_a_present_function_is_attached_with_the_right_kind() -> None:
    bpf = FakeBpf({b"__sys_accept4", b"inet_csk_complete_hashdance"})
    p = probes(bpf)
    assert p._kprobe_if_present(b"__sys_accept4", b"ret_fn", ret=True)
    assert p._kprobe_if_present(b"inet_csk_complete_hashdance", b"entry_fn")
    assert bpf.attached == [("kretprobe", b"__sys_accept4", b"ret_fn"),
                            ("kprobe", b"inet_csk_complete_hashdance", b"entry_fn")]


def test_an_absent_function_is_false_and_the_queue_probe_says_so() -> None:
    p = probes(FakeBpf(set()))
    assert not p._kprobe_if_present(b"__sys_accept4", b"ret_fn", ret=True)
    p._attach_queue_probe()
    assert any("inet_csk_complete_hashdance cannot be probed" in n for n in p.notices)


def test_a_refused_program_is_an_error_not_an_absent_function() -> None:
    p = probes(FakeBpf({b"inet_csk_complete_hashdance"}, refused={b"entry_fn"}))
    with pytest.raises(Exception, match="Failed to load"):
        p._kprobe_if_present(b"inet_csk_complete_hashdance", b"entry_fn")


def test_kretprobes_get_room_for_many_blocked_calls_or_say_why_not() -> None:
    bpf = FakeBpf({b"__sys_accept4"})
    p = probes(bpf)
    assert p._kprobe_if_present(b"__sys_accept4", b"ret_fn", ret=True)
    assert bpf.maxactive == [Probes.KRETPROBE_MAXACTIVE] and not p.notices
    refusing = FakeBpf({b"__sys_accept4"}, maxactive_ok=False)
    p = probes(refusing)
    assert p._kprobe_if_present(b"__sys_accept4", b"ret_fn", ret=True)
    assert refusing.maxactive == [0]  # the kernel's default
    assert any("could not be given room for 4096 calls" in n for n in p.notices)
    absent = probes(FakeBpf(set(), maxactive_ok=False))
    assert not absent._kprobe_if_present(b"__sys_accept4", b"ret_fn", ret=True)
    assert not absent.notices  # absent, not short of room: the caller says it
