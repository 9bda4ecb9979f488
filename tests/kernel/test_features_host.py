"""Feature probes on the real machine (root, a kernel with BTF and tracefs)."""

from __future__ import annotations

import os
import re

import pytest

from closewait_trace.kernel import btf, features
from closewait_trace.kernel.features import Backend

pytestmark = [pytest.mark.kernel, pytest.mark.per_kernel]  # BTF, features, a tracepoint load


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m, os.uname().release
    return int(m.group(1)), int(m.group(2))


def test_real_btf_inet_csk_accept_signature() -> None:
    btf.clear_cache()
    n = btf.func_arg_count("inet_csk_accept")
    # 6.10 (commit 92ef0fd55ac8) replaced (sk, flags, err, kern) by (sk, struct proto_accept_arg *).
    assert n == (2 if _kernel_version() >= (6, 10) else 4)
    assert btf.func_arg_count("tcp_close") == 2
    assert btf.func_btf_id("tcp_close") is not None
    assert btf.func_arg_count("closewait_trace_no_such_function") is None


def test_probes_return_bools() -> None:
    assert isinstance(features.kprobes_available(), bool)
    assert isinstance(features.fentry_available(), bool)
    assert isinstance(features.fentry_available("inet_csk_accept"), bool)
    assert features.btf_available() is True
    ok, why = features.fentry_probe()
    assert isinstance(ok, bool) and why


def test_probe_features_after_ensure_tracefs() -> None:
    notices = features.ensure_tracefs()
    assert all(isinstance(n, str) for n in notices)
    assert features.tracefs_root() is not None
    f = features.probe_features()
    assert f.has("sock:inet_sock_set_state"), f
    assert f.release == os.uname().release
    assert f.privileged, f.privileges
    assert f.inet_csk_accept_args in (2, 4)
    backend = features.choose_backend(f, None)
    assert isinstance(backend, Backend)
    assert features.choose_backend(f, backend.label) is backend
    assert len(features.backend_reasons(f)) == 4


def _bpftool_offset(types: list[dict[str, object]], struct: str, path: str) -> int:
    """offsetof(struct, path) from bpftool's own BTF dump: an independent reading."""
    by_id = {int(str(t["id"])): t for t in types}
    cur = next(t for t in types if t.get("name") == struct and t["kind"] == "STRUCT")
    bits = 0
    for part in path.split("."):
        members = cur["members"]
        assert isinstance(members, list)
        m = next(m for m in members if m["name"] == part)
        bits += int(m["bits_offset"])
        cur = by_id[int(m["type_id"])]
        while cur["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
            cur = by_id[int(str(cur["type_id"]))]
    return bits // 8


@pytest.fixture(scope="module")
def bpftool_types() -> list[dict[str, object]]:
    """bpftool's JSON dump of the kernel's BTF, once for the module (seconds under emulation)."""
    import json
    import subprocess
    dump = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(btf.VMLINUX_BTF)],
                          check=True, capture_output=True, text=True).stdout
    types = json.loads(dump)["types"]
    assert isinstance(types, list)
    return types


@pytest.mark.parametrize("struct, path", [
    ("task_struct", "flags"), ("task_struct", "exit_code"), ("task_struct", "tgid"),
    ("task_struct", "real_parent"), ("sock", "__sk_common.skc_family"),
    ("sock", "__sk_common.skc_net"), ("net", "ns.inum"),
])
def test_real_btf_member_offsets_match_bpftool(bpftool_types: list[dict[str, object]],
                                               struct: str, path: str) -> None:
    btf.clear_cache()
    found = btf.member(struct, path)
    assert found is not None
    assert found.offset == _bpftool_offset(bpftool_types, struct, path)


def test_every_kernel_field_the_c_reads_resolves_on_this_kernel() -> None:
    from closewait_trace.kernel.kfields import KERNEL_FIELDS, resolve_kernel_fields
    btf.clear_cache()
    fields = resolve_kernel_fields()
    assert dict(fields.disabled) == {}
    assert set(fields.offsets) == {row.name for row in KERNEL_FIELDS}
    assert fields.enabled == {row.feature for row in KERNEL_FIELDS}


def test_without_btf_offsets_the_programs_still_load_and_say_what_is_off(tmp_path: object) -> None:
    """A kernel without BTF: the programs compile without the offset-based features, and the
    notices name each one (the ready record carries the same as features_off)."""
    from pathlib import Path

    from closewait_trace.kernel.attach import ProbeSettings, Probes
    from closewait_trace.kernel.headers import candidate_header_dirs
    from closewait_trace.kernel.kfields import KERNEL_FIELDS, resolve_kernel_fields
    assert isinstance(tmp_path, Path)
    features.ensure_tracefs()
    fields = resolve_kernel_fields(path=tmp_path / "no-btf")
    probes = Probes.load(ProbeSettings(backend=Backend.TRACEPOINT, kernel_fields=fields),
                         candidate_header_dirs())
    try:
        off = {row.feature for row in KERNEL_FIELDS}
        assert set(probes.kernel_fields.disabled) == off
        for feature in off:
            assert any(n.startswith(f"{feature} is off: no kernel struct offsets")
                       for n in probes.notices), probes.notices
    finally:
        probes.close()


def test_bcc_release_is_the_one_in_use_and_the_one_asked_for() -> None:
    """doctor's BCC version is the module the tracer loads; a run in another Debian
    release's root (`make test-bcc-trixie` sets CLOSEWAIT_EXPECT_BCC) proves which BCC the
    rest of the suite ran with."""
    import importlib

    version = features.bcc_version()
    assert version is not None and version[0].isdigit(), version
    assert importlib.import_module("bcc.version").__version__ == version
    expected = os.environ.get("CLOSEWAIT_EXPECT_BCC", "")
    if expected:
        assert version == expected or version.startswith(expected + "."), version


def test_skipped_runs_are_read_from_every_loaded_program() -> None:
    """The kernel's count of each program's skipped runs is where kernel/skips.py reads it
    (fdinfo's recursion_misses, Linux 5.12+), and a quiet run skipped none."""
    from pathlib import Path

    from closewait_trace.kernel.attach import ProbeSettings, Probes
    from closewait_trace.kernel.decode import Stat
    from closewait_trace.kernel.headers import candidate_header_dirs
    from closewait_trace.kernel.skips import recursion_misses
    features.ensure_tracefs()
    probes = Probes.load(ProbeSettings(backend=Backend.TRACEPOINT), candidate_header_dirs())
    try:
        infos = [Path(f"/proc/self/fdinfo/{f.fd}").read_text() for f in probes.bpf.funcs.values()]
        assert infos
        if _kernel_version() >= (5, 12):
            assert all("recursion_misses:" in text for text in infos), infos[0]
        assert [recursion_misses(text) for text in infos] == [0] * len(infos)
        assert probes.read_stats()[Stat.KERNEL_SKIPPED] == 0
    finally:
        probes.close()
