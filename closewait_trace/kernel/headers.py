"""Kernel header trees for BCC (``BCC_KERNEL_SOURCE``).

BCC compiles its C against a kernel header tree.  closewait-trace's programs read no kernel
struct layout, so the headers of *another* kernel work when the running kernel's are missing.
This module lists usable trees, best first; the caller tries them in order and falls back to
the next one when BCC fails to compile (BCC 0.26 cannot compile against Debian's 6.12
headers, for example).

Debian splits each header package in two directories, ``linux-headers-V-common`` (the
architecture-independent part) and ``linux-headers-V-FLAVOUR`` (generated headers, .config,
``arch/ARCH``); BCC needs both in one tree.  Such pairs are merged into a tree of symlinks
(the common half, then the flavour half over it, like ``cp -as`` then ``cp -asf``) under a
cache directory, built in a temporary directory and renamed into place, then reused.

Layouts recognised (each laid out by tests/unit/test_headers.py): Debian's split pairs,
including PREEMPT_RT's ``-rt-amd64`` + ``-common-rt`` and pairs unpacked outside /usr/src;
Ubuntu's ``linux-headers-V-generic`` (complete through symlinks into ``linux-headers-V``);
RHEL/Fedora's kernel-devel in ``/usr/src/kernels/RELEASE``; and any complete tree at
``/lib/modules/RELEASE/build`` (or ``source``), e.g. a kernel built and installed by hand.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .arches import arch_of
from ..errors import KernelHeadersError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MODULES_DIR",
    "SRC_DIR",
    "HeaderCandidate",
    "candidate_header_dirs",
    "user_header_dir",
    "merge_header_trees",
    "kernel_arch",
]

DEFAULT_CACHE_DIR = Path("/var/cache/closewait-trace/headers")
MODULES_DIR = Path("/lib/modules")
SRC_DIR = Path("/usr/src")
_MARKER = ".closewait-trace-merged"
_MARKER_FORMAT = "closewait-trace merged headers v1"

T = TypeVar("T")

def kernel_arch(machine: str | None = None) -> str:
    """Kernel ``arch/`` directory name for a machine (``x86_64`` -> ``x86``)."""
    m = machine or platform.machine()
    arch = arch_of(m)
    return arch.kernel_dir if arch is not None else m


def _debian_arch(machine: str | None = None) -> str:
    m = machine or platform.machine()
    arch = arch_of(m)
    return arch.debian if arch is not None else m


@dataclass(frozen=True)
class HeaderCandidate:
    """One header tree BCC can be pointed at."""

    path: Path  # the value for BCC_KERNEL_SOURCE
    version: str  # kernel release the headers belong to, e.g. "6.1.0-56-amd64"
    origin: str  # "running kernel", "installed linux-headers-6.1.0-56", "--kernel-headers"
    notice: str  # one human sentence for the user (which headers, why)
    sources: tuple[Path, ...] = ()  # directories the tree is made of (merged trees: two)


# --------------------------------------------------------------------------------------------
# Recognising trees
# --------------------------------------------------------------------------------------------
def _unless_refused(ask: Callable[[], T], fallback: T) -> T:
    """``ask()``, or ``fallback`` where the file system raises OSError (no permission, EIO)."""
    try:
        return ask()
    except OSError:
        return fallback


def _is_file(p: Path) -> bool:
    return _unless_refused(p.is_file, False)


def _is_dir(p: Path) -> bool:
    return _unless_refused(p.is_dir, False)


def _has_kconfig(d: Path) -> bool:
    return _is_file(d / "include" / "linux" / "kconfig.h")


def _has_generated(d: Path) -> bool:
    return _is_file(d / "include" / "generated" / "autoconf.h")


def _is_complete(d: Path, karch: str) -> bool:
    """Everything BCC reads: kconfig.h, the generated autoconf.h and arch/ARCH/include."""
    return _has_kconfig(d) and _has_generated(d) and _is_dir(d / "arch" / karch / "include")


def _is_flavour_half(d: Path, karch: str) -> bool:
    """The architecture half of a split package: generated headers but no include/linux."""
    return _has_generated(d) and not _has_kconfig(d) and _is_dir(d / "arch" / karch)


def _release_of(d: Path, fallback: str) -> str:
    """Kernel release a header tree was built for (UTS_RELEASE, what ``uname -r`` says).

    (Debian's include/config/kernel.release holds the upstream version, e.g. "6.1.192",
    not the release "6.1.0-56-amd64", so it is only a fallback.)
    """
    try:
        text = (d / "include" / "generated" / "utsrelease.h").read_text(errors="replace")
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        text = (d / "include" / "config" / "kernel.release").read_text(errors="replace").strip()
        if text:
            return text.splitlines()[0].strip()
    except OSError:
        pass
    return fallback


def _makefile_common(flavour: Path) -> Path | None:
    """The common half named by the flavour's Makefile ("include /usr/src/X-common/Makefile").

    A tree unpacked elsewhere (``dpkg-deb -x`` into a cache, a copied /usr/src) still names
    the packaged path: then the same directory name next to the flavour half is used.
    """
    try:
        makefile = (flavour / "Makefile").read_text(errors="replace")
    except OSError:
        return None
    for line in makefile.splitlines():
        m = re.match(r"\s*-?include\s+(\S+)/Makefile\s*$", line)
        if not m:
            continue
        target = Path(m.group(1))
        if not target.is_absolute():
            target = flavour / target
        for cand in (target, flavour.parent / target.name):
            if cand != flavour and _has_kconfig(cand):
                return cand
    return None


def _common_for(flavour: Path) -> Path | None:
    """Find the common half of a Debian/Ubuntu split header package."""
    found = _makefile_common(flavour)
    if found is not None:
        return found
    # By name: linux-headers-6.1.0-56-cloud-amd64 -> linux-headers-6.1.0-56-common (Debian),
    # linux-headers-6.1.0-57-rt-amd64 -> linux-headers-6.1.0-57-common-rt (Debian's
    # PREEMPT_RT), linux-headers-5.15.0-91-generic -> linux-headers-5.15.0-91 (Ubuntu).
    parts = flavour.name.split("-")
    for cut in range(1, min(4, len(parts) - 2)):  # keep at least "linux-headers-VERSION"
        name, variant = "-".join(parts[:-cut]), parts[-cut]
        for cand in (f"{name}-common-{variant}", f"{name}-common", name):
            d = flavour.parent / cand
            if d != flavour and _has_kconfig(d):
                return d
    return None


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------
def _resolve(p: Path) -> Path:
    return _unless_refused(p.resolve, p)


def _overlay(src: str, dst: str, fresh: bool) -> None:
    """Mirror directory ``src`` into the existing directory ``dst`` as a tree of symlinks.

    Real directories become real directories (merged with what is there); files and symlinks
    become symlinks to the absolute path of the source entry, replacing what is there (so a
    relative symlink in the source keeps resolving from its original place).  ``fresh``:
    ``dst`` was just created and is empty (no need to look for clashes).
    """
    with os.scandir(src) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    existing: dict[str, bool] = {}  # name -> is a real directory
    if not fresh:
        with os.scandir(dst) as it:
            existing = {e.name: e.is_dir(follow_symlinks=False) for e in it}
    for name, is_dir in entries:
        source = os.path.join(src, name)
        target = os.path.join(dst, name)
        there = existing.get(name)
        if is_dir:
            if there is True:
                _overlay(source, target, False)
                continue
            if there is False:
                os.unlink(target)
            os.mkdir(target)
            _overlay(source, target, True)
        else:
            if there is True:
                shutil.rmtree(target)
            elif there is False:
                os.unlink(target)
            os.symlink(source, target)


def _marker_text(common: Path, flavour: Path) -> str:
    return f"{_MARKER_FORMAT}\n{common}\n{flavour}\n"


def _read_marker(tree: Path) -> str | None:
    try:
        return (tree / _MARKER).read_text()
    except OSError:
        return None


def _safe_name(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", version) or "unknown"


def merge_header_trees(common: Path, flavour: Path, version: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Merged symlink tree ``cache_dir/<version>`` of ``common`` overlaid by ``flavour``.

    Reused when it exists and was made from the same two directories; otherwise built in a
    temporary directory next to it and renamed into place (atomic for concurrent runs).
    Raises KernelHeadersError when the cache cannot be written.
    """
    common = _resolve(Path(os.path.abspath(common)))
    flavour = _resolve(Path(os.path.abspath(flavour)))
    dest = cache_dir / _safe_name(version)
    want = _marker_text(common, flavour)
    if _read_marker(dest) == want:
        return dest
    tmp: Path | None = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        built = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=cache_dir))
        tmp = built
        _overlay(os.fspath(common), os.fspath(built), True)
        _overlay(os.fspath(flavour), os.fspath(built), False)
        (built / _MARKER).write_text(want)
        os.chmod(built, 0o755)
        for _attempt in range(3):
            try:
                os.rename(built, dest)
                tmp = None
                return dest
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if _read_marker(dest) == want:  # another run built the same tree meanwhile
                return dest
            # A stale tree (other sources, or half built): move it aside, then retry.
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=cache_dir))
            try:
                os.rename(dest, trash / "tree")
            except FileNotFoundError:
                pass  # someone else moved it already
            finally:
                shutil.rmtree(trash, ignore_errors=True)
        raise OSError(errno.EBUSY, f"{dest} keeps being replaced by another process")
    except OSError as e:
        raise KernelHeadersError(
            f"cannot build a merged kernel header tree for {version} in {cache_dir} "
            f"(from {common} and {flavour}): {e.strerror or e}"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------
def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Natural order: 6.12.117 > 6.1.0-56; numbers compare as numbers."""
    return tuple(
        (1, int(tok), "") if tok.isdigit() else (0, 0, tok) for tok in re.split(r"(\d+)", version) if tok
    )


def _other_kernel_note(version: str, release: str) -> str:
    if version == release:
        return ""
    return (
        f"; they are not the running kernel's ({release}), which is fine: the BPF programs "
        "read no kernel struct layout"
    )


def _package_name(d: Path) -> str:
    """linux-headers-6.1.0-56-common -> linux-headers-6.1.0-56; -common-rt -> ...-rt."""
    return re.sub(r"-common(?=-[a-z0-9]+$|$)", "", d.name)


@dataclass
class _Found:
    version: str
    origin: str
    tree: Path | None  # a complete tree, used as is
    pair: tuple[Path, Path] | None  # (common, flavour) to merge
    location: Path


def _scan_src(src_dir: Path, karch: str) -> list[_Found]:
    found: list[_Found] = []
    try:
        entries = sorted(src_dir.iterdir())
    except OSError:
        return found
    dirs: list[Path] = []
    for d in entries:
        if d.name == "kernels" and _is_dir(d):  # Fedora/RHEL: /usr/src/kernels/<release>
            try:
                dirs.extend(sorted(x for x in d.iterdir() if _is_dir(x)))
            except OSError:
                pass
        elif d.name.startswith("linux") and _is_dir(d):
            dirs.append(d)
    for d in dirs:
        fallback = d.name[len("linux-headers-") :] if d.name.startswith("linux-headers-") else d.name
        if _is_complete(d, karch):
            version = _release_of(d, fallback)
            found.append(_Found(version, f"installed {d.name}", d, None, d))
        elif _is_flavour_half(d, karch):
            common = _common_for(d)
            if common is None or not _is_dir(common / "arch" / karch / "include"):
                continue
            version = _release_of(d, fallback)
            found.append(_Found(version, f"installed {_package_name(common)}", None, (common, d), d))
    return found


def _running_kernel(release: str, modules_dir: Path, karch: str) -> _Found | None:
    kdir = modules_dir / release
    build, source = kdir / "build", kdir / "source"
    if _is_complete(build, karch):
        return _Found(release, "running kernel", build, None, build)
    if _is_flavour_half(build, karch):
        common = source if _has_kconfig(source) else _common_for(_resolve(build))
        if common is not None:
            return _Found(release, "running kernel", None, (common, build), build)
    if _is_complete(source, karch):
        return _Found(release, "running kernel", source, None, source)
    return None


def candidate_header_dirs(
    release: str | None = None,
    *,
    modules_dir: Path = MODULES_DIR,
    src_dir: Path = SRC_DIR,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    machine: str | None = None,
) -> list[HeaderCandidate]:
    """Usable kernel header trees, best first.

    Order: the running kernel's own (``/lib/modules/RELEASE/build`` or ``source``, or
    ``/usr/src`` headers of RELEASE), then every other installed set, newest first.  Split
    Debian packages are merged into ``cache_dir`` (built once, then reused).
    Raises KernelHeadersError when there is none.
    """
    rel = release or os.uname().release
    candidates: list[HeaderCandidate] = []
    failures: list[str] = []
    for f in _found_trees(rel, modules_dir, src_dir, kernel_arch(machine)):
        try:
            candidates.append(_candidate(f, rel, cache_dir))
        except KernelHeadersError as e:
            failures.append(str(e))
    if not candidates:
        msg = (
            f"no kernel headers found: install linux-headers-{rel} (or linux-headers-"
            f"{_debian_arch(machine)}, any version works), or pass --kernel-headers DIR"
        )
        if failures:
            msg += "; " + "; ".join(failures)
        raise KernelHeadersError(msg)
    return candidates


def _found_trees(rel: str, modules_dir: Path, src_dir: Path, karch: str) -> list[_Found]:
    """Every header set found, the running kernel's first, then the others newest first."""
    found: list[_Found] = []
    seen: set[Path] = set()
    running = _running_kernel(rel, modules_dir, karch)
    if running is not None:
        found.append(running)
        seen.add(_resolve(running.location))
        if running.pair:
            seen.update(_resolve(p) for p in running.pair)
    others: list[_Found] = []
    for f in _scan_src(src_dir, karch):  # skip what /lib/modules gave, and /usr/src/linux links
        where = _resolve(f.location)
        if where not in seen:
            seen.add(where)
            others.append(f)
    for f in others:
        if f.version == rel:
            f.origin = f"running kernel ({f.origin})"
    others.sort(key=lambda f: _version_key(f.version), reverse=True)
    others.sort(key=lambda f: f.version != rel)  # stable: the running kernel's first
    return found + others


def _candidate(f: _Found, rel: str, cache_dir: Path) -> HeaderCandidate:
    """A usable tree from a found set: as it is, or a split pair merged into the cache."""
    note = _other_kernel_note(f.version, rel)
    if f.tree is not None:
        return HeaderCandidate(
            path=f.tree, version=f.version, origin=f.origin, sources=(f.tree,),
            notice=f"using kernel headers {f.version} ({f.origin}) at {f.tree}{note}",
        )
    assert f.pair is not None
    common, flavour = f.pair
    tree = merge_header_trees(common, flavour, f.version, cache_dir)
    return HeaderCandidate(
        path=tree, version=f.version, origin=f.origin, sources=(common, flavour),
        notice=(f"using kernel headers {f.version} ({f.origin}), merged from {common} and "
                f"{flavour} into {tree}{note}"),
    )


def user_header_dir(
    path: Path,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    machine: str | None = None,
) -> HeaderCandidate:
    """Validate a ``--kernel-headers DIR`` given by the user.

    Accepted: a tree with include/linux and arch/*/include (or a Makefile).  The flavour half
    of a split Debian package (e.g. /usr/src/linux-headers-V-amd64) is merged with its common
    half.  Raises KernelHeadersError otherwise.
    """
    karch = kernel_arch(machine)
    d = Path(os.path.abspath(path))
    if not _is_dir(d):
        raise KernelHeadersError(f"--kernel-headers {path}: no such directory")
    has_linux = _is_dir(d / "include" / "linux")
    has_arch = any(_is_dir(p) for p in d.glob("arch/*/include"))
    has_makefile = _is_file(d / "Makefile")
    version = _release_of(d, d.name[len("linux-headers-") :] if d.name.startswith("linux-headers-") else "unknown")
    if has_linux and (has_arch or has_makefile):
        warning = ""
        if not _has_generated(d):
            warning = (
                " (warning: no include/generated/autoconf.h: BCC will probably fail; "
                "an unconfigured source tree or the common half of a split package?)"
            )
        return HeaderCandidate(
            path=d,
            version=version,
            origin="--kernel-headers",
            notice=f"using kernel headers {version} from {d} (--kernel-headers){warning}",
            sources=(d,),
        )
    if _is_flavour_half(d, karch):
        common = _common_for(d)
        if common is None:
            raise KernelHeadersError(
                f"--kernel-headers {path}: this is the architecture half of a split header "
                "package (include/generated but no include/linux) and its common half "
                "(linux-headers-...-common) was not found"
            )
        tree = merge_header_trees(common, d, version, cache_dir)
        return HeaderCandidate(
            path=tree,
            version=version,
            origin="--kernel-headers",
            notice=f"using kernel headers {version} (--kernel-headers), merged from {common} and {d} into {tree}",
            sources=(common, d),
        )
    missing = []
    if not has_linux:
        missing.append("include/linux")
    if not (has_arch or has_makefile):
        missing.append("arch/*/include or a Makefile")
    raise KernelHeadersError(
        f"--kernel-headers {path}: not a kernel header tree (missing {' and '.join(missing)})"
    )
