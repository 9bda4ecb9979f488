"""Kernel-free parts of closewait_trace.facts.netns."""

from __future__ import annotations

import pytest

from pathlib import Path

from closewait_trace.errors import UsageError
from closewait_trace.facts.netns import parse_ns_link, resolve_netns


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


def test_resolve_netns_numbers_and_links() -> None:
    assert resolve_netns("4026532179") == 4026532179
    assert resolve_netns(" net:[4026531833] ") == 4026531833


def test_resolve_netns_refuses_what_is_not_a_namespace(tmp_path: Path) -> None:
    (tmp_path / "stale").touch()  # what a failed `ip netns add` leaves behind
    for text in ("", "stale", "missing", "mnt:[5]"):
        with pytest.raises(UsageError, match="--netns"):
            resolve_netns(text, run_netns=tmp_path)
