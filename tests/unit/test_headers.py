"""Kernel-free tests of closewait_trace.kernel.headers on fake /usr/src and /lib/modules trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from closewait_trace.kernel import headers as H
from closewait_trace.errors import KernelHeadersError

MACHINE = "x86_64"


def make_common(src: Path, name: str) -> Path:
    """The architecture-independent half of a Debian header package."""
    d = src / name
    (d / "include" / "linux").mkdir(parents=True)
    (d / "include" / "linux" / "kconfig.h").write_text("/* common kconfig.h */\n")
    (d / "include" / "linux" / "types.h").write_text("/* common types.h */\n")
    for arch in ("x86", "arm64"):
        (d / "arch" / arch / "include" / "asm").mkdir(parents=True)
        (d / "arch" / arch / "include" / "asm" / "ptrace.h").write_text(f"/* {arch} ptrace */\n")
    (d / "Makefile").write_text("# the real kernel Makefile\n")
    kbuild = src.parent / "lib" / f"kbuild-{name}" / "scripts"
    kbuild.mkdir(parents=True)
    (kbuild / "tool").write_text("script\n")
    os.symlink(os.path.relpath(kbuild, d), d / "scripts")  # relative, like Debian's
    return d


def make_flavour(src: Path, name: str, common: Path, release: str, arch: str = "x86") -> Path:
    """The architecture half: generated headers, .config, arch/ARCH, a one-line Makefile."""
    d = src / name
    gen = d / "include" / "generated"
    gen.mkdir(parents=True)
    (gen / "autoconf.h").write_text("#define CONFIG_X 1\n")
    (gen / "utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    (d / "include" / "config").mkdir()
    (d / "include" / "config" / "kernel.release").write_text("9.9.999\n")  # upstream version
    (d / "arch" / arch / "include" / "generated" / "asm").mkdir(parents=True)
    (d / "arch" / arch / "include" / "generated" / "asm" / "syscalls.h").write_text("/* gen */\n")
    (d / "Makefile").write_text(f"include {common}/Makefile\n")
    (d / ".config").write_text("CONFIG_X=y\n")
    return d


def debian_pair(src: Path, version: str, flavour: str = "amd64") -> tuple[Path, Path]:
    common = make_common(src, f"linux-headers-{version}-common")
    return common, make_flavour(src, f"linux-headers-{version}-{flavour}", common, f"{version}-{flavour}")


def make_complete(d: Path, release: str) -> Path:
    """A self-contained tree (Ubuntu -generic, Fedora /usr/src/kernels/R, a built kernel)."""
    (d / "include" / "linux").mkdir(parents=True)
    (d / "include" / "linux" / "kconfig.h").write_text("\n")
    (d / "include" / "generated").mkdir()
    (d / "include" / "generated" / "autoconf.h").write_text("\n")
    (d / "include" / "generated" / "utsrelease.h").write_text(f'#define UTS_RELEASE "{release}"\n')
    (d / "arch" / "x86" / "include").mkdir(parents=True)
    (d / "Makefile").write_text("\n")
    return d


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "usr" / "src"
    mods = tmp_path / "lib" / "modules"
    cache = tmp_path / "cache"
    src.mkdir(parents=True)
    mods.mkdir(parents=True)
    return src, mods, cache


def candidates(roots: tuple[Path, Path, Path], release: str = "6.18.0-fc") -> list[H.HeaderCandidate]:
    src, mods, cache = roots
    return H.candidate_header_dirs(release, modules_dir=mods, src_dir=src, cache_dir=cache, machine=MACHINE)


def test_debian_pair_is_merged(roots: tuple[Path, Path, Path]) -> None:
    src, _, cache = roots
    common, flavour = debian_pair(src, "6.1.0-56")
    [c] = candidates(roots)
    assert c.version == "6.1.0-56-amd64"  # UTS_RELEASE, not include/config/kernel.release
    assert c.origin == "installed linux-headers-6.1.0-56"
    assert c.path == cache / "6.1.0-56-amd64"
    assert c.sources == (common, flavour)
    assert "not the running kernel's" in c.notice and str(c.path) in c.notice
    t = c.path
    # both halves are there, as symlinks into the originals
    assert (t / "include" / "linux" / "kconfig.h").read_text() == "/* common kconfig.h */\n"
    assert os.readlink(t / "include" / "linux" / "kconfig.h") == str(common / "include/linux/kconfig.h")
    assert (t / "include" / "generated" / "autoconf.h").is_file()
    assert (t / "arch" / "x86" / "include" / "asm" / "ptrace.h").is_file()
    assert (t / "arch" / "x86" / "include" / "generated" / "asm" / "syscalls.h").is_file()
    assert (t / ".config").is_file()
    # the flavour's files win (cp -asf)
    assert os.readlink(t / "Makefile") == str(flavour / "Makefile")
    # directories are real, so both halves merge inside them
    assert (t / "include").is_dir() and not (t / "include").is_symlink()
    # a relative symlink of the original still resolves
    assert (t / "scripts" / "tool").read_text() == "script\n"


def test_newest_first(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    debian_pair(src, "6.1.0-56")
    debian_pair(src, "6.12.117+deb12")
    debian_pair(src, "5.10.0-30")
    assert [c.version for c in candidates(roots)] == ["6.12.117+deb12-amd64", "6.1.0-56-amd64", "5.10.0-30-amd64"]


def test_running_kernel_headers_in_usr_src_come_first(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    debian_pair(src, "6.1.0-56")
    debian_pair(src, "6.12.117+deb12")
    cs = candidates(roots, release="6.1.0-56-amd64")
    assert [c.version for c in cs] == ["6.1.0-56-amd64", "6.12.117+deb12-amd64"]
    assert cs[0].origin.startswith("running kernel")
    assert "not the running kernel" not in cs[0].notice


def test_lib_modules_build_first_and_not_listed_twice(roots: tuple[Path, Path, Path]) -> None:
    src, mods, _ = roots
    common, flavour = debian_pair(src, "6.1.0-56")
    debian_pair(src, "6.12.117+deb12")
    kdir = mods / "6.1.0-56-amd64"
    kdir.mkdir()
    os.symlink(flavour, kdir / "build")  # Debian 12: build only, no source link
    cs = candidates(roots, release="6.1.0-56-amd64")
    assert [c.version for c in cs] == ["6.1.0-56-amd64", "6.12.117+deb12-amd64"]
    assert cs[0].origin == "running kernel"
    assert (cs[0].path / "include" / "linux" / "kconfig.h").is_file()


def test_lib_modules_build_and_source(roots: tuple[Path, Path, Path]) -> None:
    src, mods, _ = roots
    common, flavour = debian_pair(src, "6.1.0-56")
    kdir = mods / "6.1.0-56-amd64"
    kdir.mkdir()
    os.symlink(flavour, kdir / "build")
    os.symlink(common, kdir / "source")
    [c] = candidates(roots, release="6.1.0-56-amd64")
    assert c.origin == "running kernel"
    assert (c.path / "include" / "generated" / "autoconf.h").is_file()
    assert (c.path / "include" / "linux" / "kconfig.h").is_file()


def test_complete_build_dir_used_as_is(roots: tuple[Path, Path, Path]) -> None:
    src, mods, cache = roots
    build = make_complete(mods / "6.18.0-fc" / "build", "6.18.0-fc")
    debian_pair(src, "6.1.0-56")
    cs = candidates(roots)
    assert cs[0].path == build and cs[0].origin == "running kernel"
    assert cs[1].version == "6.1.0-56-amd64"


def test_ubuntu_and_fedora_layouts(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    # Ubuntu: linux-headers-V (common, no generated headers) + linux-headers-V-generic (complete)
    make_common(src, "linux-headers-5.15.0-91")
    make_complete(src / "linux-headers-5.15.0-91-generic", "5.15.0-91-generic")
    make_complete(src / "kernels" / "6.5.6-300.fc39.x86_64", "6.5.6-300.fc39.x86_64")
    cs = candidates(roots)
    assert [(c.version, c.path) for c in cs] == [
        ("6.5.6-300.fc39.x86_64", src / "kernels" / "6.5.6-300.fc39.x86_64"),
        ("5.15.0-91-generic", src / "linux-headers-5.15.0-91-generic"),
    ]


def test_other_architectures_are_ignored(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    common = make_common(src, "linux-headers-6.1.0-56-common")
    make_flavour(src, "linux-headers-6.1.0-56-arm64", common, "6.1.0-56-arm64", arch="arm64")
    with pytest.raises(KernelHeadersError):
        candidates(roots)


def test_common_found_by_name_when_makefile_says_nothing(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    common, flavour = debian_pair(src, "6.1.0-56", flavour="cloud-amd64")
    (flavour / "Makefile").write_text("# nothing useful\n")
    [c] = candidates(roots)
    assert c.sources == (common, flavour)


def test_cache_is_reused(roots: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _, cache = roots
    debian_pair(src, "6.1.0-56")
    [first] = candidates(roots)
    marker_inode = (first.path / H._MARKER).stat().st_ino

    def boom(*_: object) -> None:
        raise AssertionError("rebuilt instead of reused")

    monkeypatch.setattr(H, "_overlay", boom)
    [again] = candidates(roots)
    assert again.path == first.path
    assert (again.path / H._MARKER).stat().st_ino == marker_inode
    assert [p.name for p in cache.iterdir()] == ["6.1.0-56-amd64"]  # no temp dirs left


def test_stale_cache_is_rebuilt(roots: tuple[Path, Path, Path]) -> None:
    src, _, cache = roots
    debian_pair(src, "6.1.0-56")
    stale = cache / "6.1.0-56-amd64"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("old")
    [c] = candidates(roots)
    assert c.path == stale
    assert not (stale / "junk").exists()
    assert (stale / "include" / "linux" / "kconfig.h").is_file()
    assert [p.name for p in cache.iterdir()] == ["6.1.0-56-amd64"]


def test_unwritable_cache(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, mods, _ = roots
    debian_pair(src, "6.1.0-56")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KernelHeadersError, match="cannot build a merged kernel header tree"):
        H.candidate_header_dirs("6.18.0-fc", modules_dir=mods, src_dir=src, cache_dir=blocker / "c", machine=MACHINE)


def test_no_headers(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    make_common(src, "linux-headers-6.1.0-56-common")  # a common half alone is not usable
    with pytest.raises(KernelHeadersError, match=r"no kernel headers found: install linux-headers-6\.18\.0-fc.*linux-headers-amd64"):
        candidates(roots)


def test_merge_is_idempotent_and_atomic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    common, flavour = debian_pair(src, "6.1.0-56")
    cache = tmp_path / "cache"
    a = H.merge_header_trees(common, flavour, "6.1.0-56-amd64", cache)
    b = H.merge_header_trees(common, flavour, "6.1.0-56-amd64", cache)
    assert a == b == cache / "6.1.0-56-amd64"
    assert sorted(p.name for p in cache.iterdir()) == ["6.1.0-56-amd64"]


# --- --kernel-headers -------------------------------------------------------------------------
def test_user_dir_valid(tmp_path: Path) -> None:
    d = make_complete(tmp_path / "linux-6.1", "6.1.0-custom")
    c = H.user_header_dir(d, cache_dir=tmp_path / "cache", machine=MACHINE)
    assert c.path == d and c.version == "6.1.0-custom" and c.origin == "--kernel-headers"
    assert "warning" not in c.notice


def test_user_dir_common_half_warns(tmp_path: Path) -> None:
    common = make_common(tmp_path, "linux-headers-6.1.0-56-common")
    c = H.user_header_dir(common, cache_dir=tmp_path / "cache", machine=MACHINE)
    assert c.path == common and "autoconf.h" in c.notice


def test_user_dir_flavour_half_is_merged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    common, flavour = debian_pair(src, "6.1.0-56")
    c = H.user_header_dir(flavour, cache_dir=tmp_path / "cache", machine=MACHINE)
    assert c.path == tmp_path / "cache" / "6.1.0-56-amd64"
    assert (c.path / "include" / "linux" / "kconfig.h").is_file()


def test_user_dir_flavour_half_without_common(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    flavour = make_flavour(src, "linux-headers-6.1.0-56-amd64", tmp_path / "gone", "6.1.0-56-amd64")
    with pytest.raises(KernelHeadersError, match="common half"):
        H.user_header_dir(flavour, cache_dir=tmp_path / "cache", machine=MACHINE)


def test_user_dir_not_headers(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "README").write_text("")
    with pytest.raises(KernelHeadersError, match="not a kernel header tree.*include/linux"):
        H.user_header_dir(tmp_path / "junk", machine=MACHINE)


def test_user_dir_include_linux_without_arch_or_makefile(tmp_path: Path) -> None:
    (tmp_path / "h" / "include" / "linux").mkdir(parents=True)
    with pytest.raises(KernelHeadersError, match=r"arch/\*/include or a Makefile"):
        H.user_header_dir(tmp_path / "h", machine=MACHINE)


def test_user_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(KernelHeadersError, match="no such directory"):
        H.user_header_dir(tmp_path / "nope")


def test_version_order() -> None:
    versions = ["6.1.0-56-amd64", "6.12.117+deb12-amd64", "5.10.0-30-amd64", "6.1.0-9-amd64"]
    assert sorted(versions, key=H._version_key, reverse=True) == [
        "6.12.117+deb12-amd64",
        "6.1.0-56-amd64",
        "6.1.0-9-amd64",
        "5.10.0-30-amd64",
    ]


def test_symlinked_duplicate_listed_once(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    tree = make_complete(src / "linux-6.6.1", "6.6.1")
    os.symlink(tree, src / "linux")
    [c] = candidates(roots)
    assert c.path.resolve() == tree and c.version == "6.6.1"


# --- layouts of other distributions -------------------------------------------------------------
def make_ubuntu(src: Path, version: str, flavour: str = "generic") -> tuple[Path, Path]:
    """Ubuntu: linux-headers-V (common) and linux-headers-V-FLAVOUR, whose top-level entries
    and include/* are symlinks into the common half next to its own generated files."""
    common = make_common(src, f"linux-headers-{version}")
    d = src / f"linux-headers-{version}-{flavour}"
    (d / "include" / "generated").mkdir(parents=True)
    (d / "include" / "generated" / "autoconf.h").write_text("#define CONFIG_X 1\n")
    (d / "include" / "generated" / "utsrelease.h").write_text(f'#define UTS_RELEASE "{version}-{flavour}"\n')
    (d / "arch" / "x86" / "include" / "generated").mkdir(parents=True)
    os.symlink(f"../../../../linux-headers-{version}/arch/x86/include/asm", d / "arch" / "x86" / "include" / "asm")
    os.symlink(f"../../linux-headers-{version}/include/linux", d / "include" / "linux")
    os.symlink(f"../linux-headers-{version}/scripts", d / "scripts")
    (d / "Makefile").write_text("# the real kernel Makefile, copied\n")
    (d / ".config").write_text("CONFIG_X=y\n")
    return common, d


def test_ubuntu_running_kernel_build_link(roots: tuple[Path, Path, Path]) -> None:
    src, mods, _ = roots
    _, generic = make_ubuntu(src, "5.15.0-91")
    make_ubuntu(src, "5.15.0-88")
    (mods / "5.15.0-91-generic").mkdir()
    os.symlink(generic, mods / "5.15.0-91-generic" / "build")
    cs = candidates(roots, release="5.15.0-91-generic")
    assert [(c.version, c.origin) for c in cs] == [
        ("5.15.0-91-generic", "running kernel"),
        ("5.15.0-88-generic", "installed linux-headers-5.15.0-88-generic"),
    ]
    assert cs[0].path == mods / "5.15.0-91-generic" / "build"  # complete through its links: no merge
    assert (cs[0].path / "include" / "linux" / "kconfig.h").read_text() == "/* common kconfig.h */\n"


def test_single_build_tree_of_a_built_kernel(roots: tuple[Path, Path, Path]) -> None:
    """`make modules_install` of a kernel built by hand: build is a real, complete tree."""
    src, mods, _ = roots
    build = make_complete(mods / "6.6.7-custom" / "build", "6.6.7-custom")
    os.symlink("build", mods / "6.6.7-custom" / "source")
    debian_pair(src, "6.1.0-56")
    cs = candidates(roots, release="6.6.7-custom")
    assert [(c.path, c.origin) for c in cs][0] == (build, "running kernel")
    assert [c.version for c in cs] == ["6.6.7-custom", "6.1.0-56-amd64"]


def test_rhel_kernel_devel(roots: tuple[Path, Path, Path]) -> None:
    """RHEL/Fedora: kernel-devel is a complete tree in /usr/src/kernels/RELEASE, linked from
    /lib/modules/RELEASE/build; other installed kernel-devel packages are fallbacks."""
    src, mods, _ = roots
    running = make_complete(src / "kernels" / "4.18.0-513.5.1.el8_9.x86_64", "4.18.0-513.5.1.el8_9.x86_64")
    make_complete(src / "kernels" / "4.18.0-477.10.1.el8_8.x86_64", "4.18.0-477.10.1.el8_8.x86_64")
    (mods / "4.18.0-513.5.1.el8_9.x86_64").mkdir()
    os.symlink(running, mods / "4.18.0-513.5.1.el8_9.x86_64" / "build")
    cs = candidates(roots, release="4.18.0-513.5.1.el8_9.x86_64")
    assert [(c.version, c.origin) for c in cs] == [
        ("4.18.0-513.5.1.el8_9.x86_64", "running kernel"),
        ("4.18.0-477.10.1.el8_8.x86_64", "installed 4.18.0-477.10.1.el8_8.x86_64"),
    ]
    assert cs[0].sources == (mods / "4.18.0-513.5.1.el8_9.x86_64" / "build",)


def test_rhel_kernel_devel_without_build_link(roots: tuple[Path, Path, Path]) -> None:
    src, _, _ = roots
    tree = make_complete(src / "kernels" / "5.14.0-362.8.1.el9_3.x86_64", "5.14.0-362.8.1.el9_3.x86_64")
    [c] = candidates(roots, release="5.14.0-362.8.1.el9_3.x86_64")
    assert c.path == tree and c.origin == "running kernel (installed 5.14.0-362.8.1.el9_3.x86_64)"


def test_debian_rt_pair(roots: tuple[Path, Path, Path]) -> None:
    """Debian's PREEMPT_RT headers: linux-headers-V-rt-amd64 + linux-headers-V-common-rt."""
    src, _, cache = roots
    common = make_common(src, "linux-headers-6.1.0-57-common-rt")
    flavour = make_flavour(src, "linux-headers-6.1.0-57-rt-amd64", common, "6.1.0-57-rt-amd64")
    (flavour / "Makefile").write_text("# nothing useful\n")  # found by name, not by Makefile
    debian_pair(src, "6.1.0-57")
    cs = candidates(roots, release="6.1.0-57-rt-amd64")
    assert [(c.version, c.origin) for c in cs] == [
        ("6.1.0-57-rt-amd64", "running kernel (installed linux-headers-6.1.0-57-rt)"),
        ("6.1.0-57-amd64", "installed linux-headers-6.1.0-57"),
    ]
    assert cs[0].sources == (common, flavour) and cs[0].path == cache / "6.1.0-57-rt-amd64"


def test_unpacked_elsewhere_makefile_names_packaged_path(tmp_path: Path, roots: tuple[Path, Path, Path]) -> None:
    """Packages unpacked with dpkg-deb -x into another root: the flavour's Makefile still says
    /usr/src/...; the common half with that name next to it is the one."""
    src, _, _ = roots
    common = make_common(src, "linux-headers-5.10.0-46-common")
    flavour = make_flavour(src, "linux-headers-5.10.0-46-amd64", Path("/usr/src/linux-headers-5.10.0-46-common"),
                           "5.10.0-46-amd64")
    [c] = candidates(roots)
    assert c.sources == (common, flavour)
    u = H.user_header_dir(flavour, cache_dir=tmp_path / "c2", machine=MACHINE)
    assert u.sources == (common, flavour) and u.version == "5.10.0-46-amd64"
