"""Untrusted text made safe for people: the one escaping function of every human edge.

Everything read from the traced system (process names, command lines, cgroup paths, container
names) is chosen by whoever runs the traced code, and a root user reads it in a terminal. A
name such as ``"\\x1b[2J"`` would clear that terminal; ``"a\\nLEAK forged"`` would forge an output
line. So text from outside is decoded with ``surrogateescape`` (invalid UTF-8 survives as lone
surrogates) and every writer meant for a person passes it through :func:`visible`, which shows
control characters and undecodable bytes as escapes instead of letting them act.

Machine outputs (JSON) keep the true value: their encoder escapes it for its own format.
"""

from __future__ import annotations

import unicodedata

#: Characters that are printed as themselves although unicodedata calls them "other".
_KEEP = frozenset(" ")


def decode(raw: bytes) -> str:
    """Bytes from the kernel or /proc as text; invalid UTF-8 is kept (as lone surrogates)
    for :func:`visible` to show, not replaced or dropped."""
    return raw.decode("utf-8", errors="surrogateescape")


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    """Control, format, surrogate, unassigned and separator characters other than a space:
    anything a terminal might act on or that hides what a name really is."""
    if ch in _KEEP:
        return False
    category = unicodedata.category(ch)
    return category[0] in "CZ" or ch == "\\"


def visible(text: object) -> str:
    """``text`` with every character a terminal could act on shown as an escape.

    Backslashes are escaped too, so the output is unambiguous: ``a\\x1bb`` on screen is always
    the four-character name ``a``, ESC, ``b``... written out, never a name that contained a
    backslash. Bytes are decoded first; other values are formatted with ``str``."""
    if isinstance(text, bytes):
        text = decode(text)
    elif not isinstance(text, str):
        text = str(text)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case, without a per-character walk
    return "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)
