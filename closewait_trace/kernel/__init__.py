"""The kernel side: everything that talks to the kernel, BPF, BTF or the shipped C header.

What the running kernel offers (features), where its headers are (headers), field offsets read
from its BTF (btf, kfields), finding, compiling and attaching the BPF programs in bpf/ (bpfdir,
attach), and turning the C header's structs and the events they carry into Python (cheader,
decode). The rest of the package sees the kernel only through these modules.
"""
