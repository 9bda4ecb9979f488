"""Build a merged Debian kernel header tree for BCC, for the VM runner and its selftest.

Debian splits a header package in ``linux-headers-V-common`` and ``linux-headers-V-amd64``;
BCC (``BCC_KERNEL_SOURCE``) needs both in one tree.  The tree is made of symlinks: the common
half first, then the flavour half over it (the same as ``cp -as COMMON/. T/`` then
``cp -asf FLAVOUR/. T/``).  It is built in a temporary directory next to the destination and
renamed into place, so concurrent builders never see half a tree, and reused afterwards.

The symlinks are absolute (``/usr/src/...``), so a tree built on the host resolves inside a
virtme-ng guest too, which sees the host's root filesystem.  Building it on the host takes a
few seconds; doing the same inside a TCG guest over 9p is far slower, so the runner builds it
before booting and hands the path to the guest (``CLOSEWAIT_VM_KHEADERS``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SRC_DIR = Path("/usr/src")
DEFAULT_DEST = Path("/tmp/closewait-vm/kheaders")
_DONE = ".merged-complete"


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def find_header_pair(series: str = "6.1", src: Path = SRC_DIR) -> tuple[Path, Path] | None:
    """Newest (common, amd64) header directory pair of a kernel series, e.g. ``6.1``."""
    pairs = []
    for common in src.glob(f"linux-headers-{series}.*-common"):
        abi = common.name[len("linux-headers-") : -len("-common")]
        flavour = src / f"linux-headers-{abi}-amd64"
        if flavour.is_dir():
            pairs.append((_version_key(abi), common, flavour))
    if not pairs:
        return None
    _, common, flavour = max(pairs)
    return common, flavour


def merged_tree(series: str = "6.1", dest_root: Path = DEFAULT_DEST, src: Path = SRC_DIR) -> Path | None:
    """Return a merged header tree for ``series`` (building it once), or None if no headers."""
    pair = find_header_pair(series, src)
    if pair is None:
        return None
    common, flavour = pair
    abi = common.name[len("linux-headers-") : -len("-common")]
    dest = dest_root / f"{abi}-amd64"
    if (dest / _DONE).exists():
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{abi}-", dir=dest_root))
    try:
        subprocess.run(["cp", "-as", f"{common}/.", f"{tmp}/"], check=True)
        subprocess.run(["cp", "-asf", f"{flavour}/.", f"{tmp}/"], check=True)
        (tmp / _DONE).write_text(f"{common}\n{flavour}\n")
        try:
            tmp.rename(dest)
        except OSError:
            # Someone else finished first (dest exists and is not empty): use theirs.
            if not (dest / _DONE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    print(merged_tree(sys.argv[1] if len(sys.argv) > 1 else "6.1") or "no headers")
