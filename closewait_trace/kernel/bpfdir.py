"""Where the BPF C sources are: bpf/ of a source checkout, or closewait_trace/bpf of an
installed package (the wheel, the Debian package and the image all put them there)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BpfLoadError


def bpf_source_dir() -> Path:
    """bpf/ of a source checkout, or closewait_trace/bpf of an installed package."""
    package = Path(__file__).resolve().parent.parent  # closewait_trace/, this file is in kernel/
    for candidate in (package / "bpf", package.parent / "bpf"):
        if (candidate / "closewait.bpf.c").is_file():
            return candidate
    raise BpfLoadError(
        f"the BPF sources are missing (looked in {package / 'bpf'} and {package.parent / 'bpf'})")
