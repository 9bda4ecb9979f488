"""Kernel-free parts of closewait_trace.netns."""

from __future__ import annotations

import pytest

from closewait_trace.netns import parse_ns_link


@pytest.mark.parametrize(("text", "inode"), [
    ("net:[4026531833]", 4026531833),
    ("mnt:[1]", 1),
    ("net:[]", None),
    ("net:[12a]", None),
    ("socket:[12", None),
    (":[5]", None),
    ("", None),
])
def test_parse_ns_link(text: str, inode: int | None) -> None:
    assert parse_ns_link(text) == inode
