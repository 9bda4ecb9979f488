"""The machines the tracer knows: for each, where its kernel headers are and its bpf(2) number.

One row a machine, as ``platform.machine()`` names it: the directory under ``arch/`` of a
kernel tree (kernel/headers.py), the Debian architecture of its header packages (the hint
when none is installed) and ``__NR_bpf`` (the fentry probe of kernel/features.py).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    kernel_dir: str  # arch/<kernel_dir> in a kernel tree
    debian: str  # Debian's name for it (linux-headers-*-<debian>)
    nr_bpf: int  # __NR_bpf


#: platform.machine()  arch/      Debian     __NR_bpf
_TABLE = """
    x86_64             x86        amd64      321
    i386               x86        i386       357
    i686               x86        i386       357
    aarch64            arm64      arm64      280
    arm64              arm64      arm64      280
    armv7l             arm        armhf      386
    armv6l             arm        armel      386
    ppc64le            powerpc    ppc64el    361
    ppc64              powerpc    ppc64      361
    s390x              s390       s390x      351
    riscv64            riscv      riscv64    280
    loongarch64        loongarch  loong64    280
    mips64             mips       mips64el   5315
"""

ARCHES: dict[str, Arch] = {
    machine: Arch(kernel_dir, debian, int(nr_bpf))
    for machine, kernel_dir, debian, nr_bpf in (row.split() for row in _TABLE.strip().splitlines())
}


def arch_of(machine: str | None = None) -> Arch | None:
    """The row of MACHINE (default: this one); None for a machine not in the table."""
    return ARCHES.get(machine or platform.machine())
