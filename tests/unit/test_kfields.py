"""kfields: the table of kernel struct fields the C reads, resolved against a BTF blob
(kernel-free: the miniature layouts of test_btf)."""

from __future__ import annotations

from pathlib import Path

import pytest

from closewait_trace.kernel import btf
from closewait_trace.kernel.kfields import (
    KERNEL_FIELDS,
    KernelField,
    KernelFields,
    resolve_kernel_fields,
)

from .test_btf import layouts, write


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    btf.clear_cache()


def test_the_real_table_resolves_against_task_struct(tmp_path: Path) -> None:
    # The miniature's `sock` (from sample()) has no sk_uid, skc_net nor sk_socket: those
    # features are off.
    fields = resolve_kernel_fields(path=write(tmp_path, layouts().blob()))
    assert fields.disabled == {"owner-room": "sock.sk_uid is not in the kernel's BTF",
                               "netns": "sock.__sk_common.skc_net is not in the kernel's BTF",
                               "listener-link": "sock.sk_socket is not in the kernel's BTF",
                               "raw-tracepoint": "sock.sk_protocol is not in the kernel's BTF"}
    assert fields.offsets == {"TASK_FLAGS": 44, "TASK_EXIT_CODE": 1164}
    assert fields.cflags() == ["-DCW_OFF_TASK_EXIT_CODE=1164", "-DCW_OFF_TASK_FLAGS=44",
                               "-DCW_HAVE_PROCESS_EXIT"]
    assert fields.notices() == [
        "listener-link is off: sock.sk_socket is not in the kernel's BTF",
        "netns is off: sock.__sk_common.skc_net is not in the kernel's BTF",
        "owner-room is off: sock.sk_uid is not in the kernel's BTF",
        "raw-tracepoint is off: sock.sk_protocol is not in the kernel's BTF"]
    assert fields.state_probe == "tracepoint/sock/inet_sock_set_state"
    assert {row.feature for row in KERNEL_FIELDS} == fields.enabled | set(fields.disabled)


def test_a_feature_with_one_field_missing_or_of_another_size_is_off_alone(tmp_path: Path) -> None:
    rows = (
        KernelField("NET", "inet_sk", "__sk_common.skc_net", 8, "netns"),
        KernelField("INUM", "net", "ns.no_such_member", 4, "netns"),
        KernelField("FAMILY", "inet_sk", "__sk_common.skc_family", 4, "family"),  # it is 2
        KernelField("PARENT", "task_struct", "real_parent", 8, "parent-walk"),
    )
    fields = resolve_kernel_fields(rows, write(tmp_path, layouts().blob()))
    assert fields.offsets == {"PARENT": 1280}
    assert fields.enabled == {"parent-walk"}
    assert fields.disabled == {
        "netns": "net.ns.no_such_member is not in the kernel's BTF",
        "family": "inet_sk.__sk_common.skc_family is 2 bytes on this kernel, 4 expected",
    }
    assert fields.cflags() == ["-DCW_OFF_PARENT=1280", "-DCW_HAVE_PARENT_WALK"]
    assert fields.notices()[0].startswith("family is off: ")


def test_without_btf_every_feature_is_off_and_says_why(tmp_path: Path) -> None:
    fields = resolve_kernel_fields(path=tmp_path / "missing")
    assert fields.offsets == {} and fields.enabled == frozenset()
    assert set(fields.disabled) == {row.feature for row in KERNEL_FIELDS}
    assert all("no kernel struct offsets (no BTF file at" in why
               for why in fields.disabled.values())
    assert fields.cflags() == []


def test_a_feature_turned_off_drops_its_offsets_and_says_why() -> None:
    fields = KernelFields(offsets={"SOCK_PROTOCOL": 532, "SOCK_FAMILY": 16, "TASK_FLAGS": 44},
                          enabled=frozenset({"raw-tracepoint", "process-exit"}))
    assert fields.state_probe == "raw_tp/inet_sock_set_state"
    classic = fields.without("raw-tracepoint", "asked for")
    assert classic.offsets == {"TASK_FLAGS": 44}
    assert classic.enabled == {"process-exit"}
    assert classic.disabled == {"raw-tracepoint": "asked for"}
    assert classic.state_probe == "tracepoint/sock/inet_sock_set_state"
    assert "-DCW_HAVE_RAW_TRACEPOINT" not in classic.cflags()
    assert classic.without("raw-tracepoint", "again") is classic
