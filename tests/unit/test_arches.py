"""The one table of machines: kernel arch/ directory, Debian architecture, __NR_bpf."""

from __future__ import annotations

from closewait_trace.kernel import headers
from closewait_trace.kernel.arches import ARCHES, Arch, arch_of


def test_rows_are_read_from_the_table() -> None:
    assert len(ARCHES) == 13
    assert arch_of("x86_64") == Arch("x86", "amd64", 321)
    assert arch_of("aarch64") == Arch("arm64", "arm64", 280)
    assert arch_of("mips64") == Arch("mips", "mips64el", 5315)
    assert arch_of("vax") is None


def test_headers_fall_back_to_the_machine_name() -> None:
    assert headers.kernel_arch("ppc64le") == "powerpc"
    assert headers._debian_arch("armv7l") == "armhf"
    assert headers.kernel_arch("vax") == "vax"
    assert headers._debian_arch("vax") == "vax"
