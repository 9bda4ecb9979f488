"""Host-side tests of tests/vm/runner.py with a fake `vng` (no QEMU, no kernel, a few seconds).

The fake vng runs the guest script (run.sh) directly on the host, or simulates a hang, a
kernel panic (vng rc 255, no exit status) or a guest that never boots, so the runner's
verdicts are checked without booting anything.  The real thing: see tests/vm/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from . import hotlayer, runner

FAKE_VNG = """\
#!{python}
import os, subprocess, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("virtme-ng 0.0-fake"); sys.exit(0)
script = args[args.index("--exec") + 1]
mode = os.environ.get("FAKE_VNG_MODE", "run")
print("[    0.000000] fake console: booting", file=sys.stderr, flush=True)
if mode == "noboot":
    sys.exit(1)
if mode == "panic":
    print("Kernel panic - not syncing: fake", file=sys.stderr); sys.exit(255)
if mode == "hang":
    # like vng -> virtme-run -> qemu: a child that never ends, its pid for the test
    child = subprocess.Popen(["sleep", "1000"])
    open(os.environ["FAKE_VNG_PIDFILE"], "w").write(str(child.pid))
    sys.exit(child.wait() and 255)
sys.exit(subprocess.call(script, shell=True))
"""

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}"
 failures="{f}" skipped="{s}" tests="{t}" time="0.1"/></testsuites>"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    vng = tmp_path / "vng"
    vng.write_text(FAKE_VNG.format(python=sys.executable))
    vng.chmod(0o755)
    image = tmp_path / "boot" / "vmlinuz-6.1.0-99-amd64"
    image.parent.mkdir()
    image.write_bytes(b"not a kernel")
    monkeypatch.setenv("CLOSEWAIT_VM_SKIP_QEMU_CHECK", "1")
    tree = tmp_path / "stdlib"  # the hot layer's tar: small, and in tmp_path
    tree.mkdir()
    (tree / "os.py").write_text("")
    monkeypatch.setattr(runner, "HOT_DIR", tmp_path / "hot")
    monkeypatch.setattr(hotlayer, "python_trees", lambda repo: [tree])
    return {"vng": vng, "image": image, "logs": tmp_path / "logs"}


def _run(fake: dict[str, Path], cmd: str, *extra: str) -> int:
    return runner.main(["--vng", str(fake["vng"]), "--kernels", str(fake["image"]), "--backends",
                        "kprobe", "--logs", str(fake["logs"]), "--no-kheaders", *extra, "--", cmd])


def _cell(fake: dict[str, Path]) -> Path:
    return fake["logs"] / "6.1.0-99-amd64-kprobe"


def test_passing_cell_counts_junit(fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    xml = JUNIT.format(t=5, f=0, e=0, s=2).replace('"', '\\"')
    rc = _run(fake, f'test "$CLOSEWAIT_VM_BACKEND" = {{backend}} && echo "{xml}" > {{junit}}')
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("6.1.0-99-amd64"))
    cols = line.split()
    assert cols[2:7] == ["kprobe", "3", "0", "2", "0"] and cols[-1] == "PASS", line
    assert (_cell(fake) / "exit-status").read_text().strip() == "0"
    assert "1 passed, 0 failed" in out


def test_failing_command_fails_the_cell(fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(fake, "echo boom; exit 3") == 1
    out = capsys.readouterr().out
    assert "command exited 3" in out and "| boom" in out
    assert str(_cell(fake) / "console.log") in out


def test_junit_failures_fail_even_with_exit_0(fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    xml = JUNIT.format(t=2, f=1, e=0, s=0).replace('"', '\\"')
    assert _run(fake, f'echo "{xml}" > {{junit}}') == 1
    assert "junit: 1 failed" in capsys.readouterr().out


def test_report_names_each_failed_test_with_its_message(
        fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The output log's last lines may be pytest's durations: the report says what failed."""
    xml = ('<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="0" tests="3">'
           '<testcase classname="tests.kernel.a" name="test_ok"/>'
           '<testcase classname="tests.kernel.a" name="test_late"><failure message="AssertionError:'
           ' (1.4, 0.02)&#10;assert 1.4 &lt;= 1.02">trace</failure></testcase>'
           '<testcase classname="tests.kernel.b" name="test_boom"><error message="">'
           'RuntimeError: no tracer</error></testcase>'
           '</testsuite></testsuites>').replace('"', '\\"')
    assert _run(fake, f'echo "{xml}" > {{junit}}') == 1
    out = capsys.readouterr().out
    assert "junit: 1 failed, 1 errors" in out
    assert "    tests.kernel.a::test_late: AssertionError: (1.4, 0.02) assert 1.4 <= 1.02\n" in out
    assert "    tests.kernel.b::test_boom: RuntimeError: no tracer\n" in out
    assert "test_ok" not in out


def test_report_shows_control_characters_of_the_output_as_escapes(
        fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An output line may quote a traced process's name: a terminal must not act on it (the
    junit XML cannot hold control characters: pytest writes them as #x1B)."""
    assert _run(fake, 'printf "name \\033[2J\\n"; exit 1') == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "| name \\x1b[2J" in out


def test_report_names_at_most_ten_failed_tests(
        fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cases = "".join(f'<testcase classname="t" name="test_{i}"><error message="fixture"/></testcase>'
                    for i in range(12))
    xml = (f'<testsuites><testsuite name="pytest" errors="12" failures="0" skipped="0" tests="12">'
           f'{cases}</testsuite></testsuites>').replace('"', '\\"')
    assert _run(fake, f'echo "{xml}" > {{junit}}') == 1
    out = capsys.readouterr().out
    assert "    t::test_9: fixture\n" in out and "test_10" not in out
    assert "    ... and 2 more\n" in out


def test_missing_junit_fails_when_cmd_names_it(fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(fake, "true # would write {junit}") == 1
    assert "no junit XML" in capsys.readouterr().out


def test_panic_without_exit_status_fails(fake: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "panic")
    assert _run(fake, "true") == 1
    assert "did not boot" in capsys.readouterr().out


def test_hang_is_killed_at_timeout(fake: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FAKE_VNG_MODE", "hang")
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_VNG_PIDFILE", str(pidfile))
    t = time.monotonic()
    assert _run(fake, "true", "--timeout", "2") == 1
    assert time.monotonic() - t < 20
    assert "timeout: killed after 2s" in capsys.readouterr().out
    child = int(pidfile.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"


def test_missing_kernel_is_a_failed_cell(fake: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = runner.main(["--vng", str(fake["vng"]), "--kernels", "2.6", "--backends", "x",
                      "--logs", str(fake["logs"]), "--no-kheaders", "--", "true"])
    assert rc == 1
    assert "not installed" in capsys.readouterr().out


def test_kernel_discovery_newest_per_series(tmp_path: Path) -> None:
    for name in ["vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-6.12.117+deb12-amd64",
                 "vmlinuz-6.12.9+deb12-amd64", "config-6.1.0-56-amd64"]:
        (tmp_path / name).write_text("")
    newest = runner.newest_per_series(runner.installed_kernels(tmp_path))
    assert newest["6.1"].release == "6.1.0-56-amd64"
    assert newest["6.12"].release == "6.12.117+deb12-amd64"
    assert runner.resolve_kernel("6.12", tmp_path).image == tmp_path / "vmlinuz-6.12.117+deb12-amd64"
    assert runner.resolve_kernel("6.1.0-9-amd64", tmp_path).release == "6.1.0-9-amd64"
    assert runner.resolve_kernel("5.10", tmp_path) is None


def test_parse_junit_and_substitute(tmp_path: Path) -> None:
    p = tmp_path / "j.xml"
    p.write_text(JUNIT.format(t=10, f=2, e=1, s=3))
    c = runner.parse_junit(p)
    assert (c.passed, c.failed, c.errors, c.skipped) == (4, 2, 1, 3)
    assert runner.substitute("X={backend} ${HOME} {other}", {"backend": "fentry"}) == "X=fentry ${HOME} {other}"


def test_guest_script_is_written(fake: dict[str, Path]) -> None:
    assert _run(fake, "echo {backend} {kernel}", "--dry-run", "--env", "FOO={backend}-x") == 0
    d = _cell(fake)
    assert (d / "cmd.sh").read_text().strip() == "echo kprobe 6.1"
    run_sh = (d / "run.sh").read_text()
    assert "export FOO=kprobe-x" in run_sh and "export CLOSEWAIT_VM_RELEASE=6.1.0-99-amd64" in run_sh
    # in a guest, the command is interrupted SOFT_GRACE s before the default timeout
    soft = runner.DEFAULT_TIMEOUT - runner.SOFT_GRACE
    assert f"left=$(( {soft} - $(cut -d. -f1 /proc/uptime) ))" in run_sh
    assert 'timeout -s INT -k 60 "$left" bash "$R/cmd.sh"' in run_sh
    assert "export CLOSEWAIT_VM_PER_KERNEL=1" in run_sh  # the kernel's only cell
    vng_cmd = (d / "vng-cmd.txt").read_text()
    for flag in ["--disable-kvm", "--force-9p", "--user root", f"--rwdir {d}", "--overlay-rwdir",
                 "virtio-serial-device.max_ports=2"]:
        assert flag in vng_cmd, flag


def test_module_docstring_documents_cli() -> None:
    doc = textwrap.dedent(runner.__doc__ or "")
    for word in ["--kernels", "--backends", "--timeout", "--logs", "--list", "{backend}", "{junit}"]:
        assert word in doc
    assert os.path.exists(Path(runner.__file__).with_name("README.md"))


def test_series_of_releases() -> None:
    assert runner.series_of("6.1.0-57-amd64") == "6.1"
    assert runner.series_of("6.1.0-57-rt-amd64") == "6.1-rt"
    assert runner.series_of("5.10.0-46-amd64") == "5.10"
    assert runner.series_of("6.12.117+deb12-amd64") == "6.12"
    assert runner.series_of("6.6.7-rt12") == "6.6-rt"
    assert runner.series_of("garbage") is None


def _unpacked(cache: Path, release: str) -> Path:
    """What scripts/vm-kernels.sh leaves: CACHE/RELEASE/{boot,usr/src}, and .complete."""
    root = cache / release
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{release}").write_text("")
    (root / "usr" / "src" / f"linux-headers-{release}").mkdir(parents=True)
    (root / ".complete").write_text("linux-image\n")
    return root


def test_unpacked_kernels_are_found_beside_boot(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-57-amd64").write_text("")
    cache = tmp_path / "kernels"
    r510 = _unpacked(cache, "5.10.0-46-amd64")
    rt = _unpacked(cache, "6.1.0-57-rt-amd64")
    half = cache / "5.10.0-99-amd64"  # an interrupted fetch: no .complete, ignored
    (half / "boot").mkdir(parents=True)
    (half / "boot" / "vmlinuz-5.10.0-99-amd64").write_text("")
    dirs = runner.kernel_dirs(boot, cache)
    assert dirs == [boot, r510 / "boot", rt / "boot"]
    newest = runner.newest_per_series(runner.installed_kernels(dirs))
    assert sorted(newest) == ["5.10", "6.1", "6.1-rt"]
    assert newest["6.1"].root is None and newest["6.1"].image == boot / "vmlinuz-6.1.0-57-amd64"
    assert newest["6.1-rt"].root == rt and newest["5.10"].root == r510
    assert runner.resolve_kernel("6.1-rt", dirs) == newest["6.1-rt"]
    installed, unpacked = runner.guest_prelude(newest["6.1"]), runner.guest_prelude(newest["6.1-rt"])
    assert f"ln -sfn {runner.HEADER_CACHE} /var/cache/closewait-trace/headers" in installed
    assert "/usr/src/" not in installed and f"for d in {rt}/usr/src/*" in unpacked
    assert installed.startswith("if grep -q virtme_ /proc/cmdline; then")


def test_unpacked_kernel_guest_links_its_headers(fake: dict[str, Path], tmp_path: Path) -> None:
    root = _unpacked(tmp_path / "kernels", "5.10.0-46-amd64")
    image = root / "boot" / "vmlinuz-5.10.0-46-amd64"
    runner.main(["--vng", str(fake["vng"]), "--kernels", str(image), "--backends", "tracepoint",
                 "--logs", str(fake["logs"]), "--no-kheaders", "--dry-run", "--", "true"])
    run_sh = (fake["logs"] / "5.10.0-46-amd64-tracepoint" / "run.sh").read_text()
    # an unpacked kernel given by its path is still booted with its own headers linked
    assert f"for d in {root}/usr/src/*; do ln -sfn" in run_sh


def test_per_kernel_backends() -> None:
    assert runner.parse_kernels("5.10, 6.1-rt:kprobe+tracepoint,6.12:", "kprobe,fentry") == [
        ("5.10", ["kprobe", "fentry"]),
        ("6.1-rt", ["kprobe", "tracepoint"]),
        ("6.12", []),
    ]


def _cells(spec: list[tuple[str, str]]) -> list[runner.Cell]:
    return [runner.Cell(k, b, None, Path(f"/x/{k}-{b}")) for k, b in spec]


def test_one_cell_per_kernel_runs_the_per_kernel_tests_and_starts_first() -> None:
    cells = runner.assign_per_kernel(_cells([
        ("6.1", "kprobe"), ("6.1", "fentry"), ("6.1", "tracepoint"),
        ("6.12", "kprobe"), ("6.12", "tracepoint"), ("5.10", "fentry"), ("5.10", "kprobe")]))
    assert [(c.name, c.per_kernel) for c in cells] == [
        ("6.1-tracepoint", True), ("6.12-tracepoint", True), ("5.10-fentry", True),
        ("6.1-kprobe", False), ("6.1-fentry", False), ("6.12-kprobe", False),
        ("5.10-kprobe", False)]


def test_cell_env_reaches_that_cell_only(fake: dict[str, Path]) -> None:
    assert _run(fake, "true", "--dry-run", "--backends", "kprobe,fentry", "--cell-env",
                "6.1.0-99-amd64-fentry:CLOSEWAIT_FORCE_PERF_BUFFER=1") == 0
    fentry = (fake["logs"] / "6.1.0-99-amd64-fentry" / "run.sh").read_text()
    kprobe = (_cell(fake) / "run.sh").read_text()
    assert "export CLOSEWAIT_FORCE_PERF_BUFFER=1" in fentry
    assert "CLOSEWAIT_FORCE_PERF_BUFFER" not in kprobe


def test_cell_env_for_an_unknown_cell_is_a_usage_error(fake: dict[str, Path]) -> None:
    with pytest.raises(SystemExit) as exc:
        _run(fake, "true", "--dry-run", "--cell-env", "6.1-nothing:A=1")
    assert exc.value.code == 2


def test_hot_layer_tar_holds_the_trees_but_what_it_leaves_out(tmp_path: Path) -> None:
    tree = tmp_path / "usr" / "lib" / "python3.11"
    (tree / "json").mkdir(parents=True)
    (tree / "json" / "__init__.py").write_text("")
    (tree / "test").mkdir()
    (tree / "test" / "big.py").write_text("")
    tar = hotlayer.build(tmp_path / "hot", [tree])
    names = set(subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True,
                               check=True).stdout.split())
    rel = str(tree.relative_to("/"))
    assert f"{rel}/json/__init__.py" in names
    assert not any(n.startswith(f"{rel}/test") for n in names), names
    assert hotlayer.build(tmp_path / "hot", [tree]) != tar  # each run its own


def test_hot_layer_guest_lines_overlay_each_tree_and_fall_back_to_9p(tmp_path: Path) -> None:
    tar = tmp_path / "python.tar"
    trees = [Path("/usr/lib/python3.11"), Path("/work/x/.venv/lib/python3.11/site-packages")]
    script = "\n".join(hotlayer.guest_lines(tar, trees))
    for t in trees:
        assert (f"mount -t overlay closewait-hot -o ro,lowerdir={hotlayer.GUEST_HOT}{t}:"
                f"{hotlayer.GUEST_LOWER}{t} {t} || echo") in script
    assert f"tar -xf {tar} -C {hotlayer.GUEST_HOT}; then" in script
    # no tar (or no tmpfs room): the script goes on over 9p, and says so
    r = subprocess.run(["bash", "-c", f"set -u\n{script}\necho went-on"], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "went-on" and "no hot layer" in r.stderr, r


def test_hot_layer_is_in_the_guest_script_unless_turned_off(fake: dict[str, Path]) -> None:
    """The run's own tar is in the guest script, and gone after the run."""
    assert _run(fake, "true") == 0
    script = (_cell(fake) / "run.sh").read_text()
    tars = re.findall(r"tar -xf (\S+) -C", script)
    assert len(tars) == 1 and tars[0].startswith(str(runner.HOT_DIR)), script
    assert not Path(tars[0]).exists() and list(runner.HOT_DIR.iterdir()) == []
    assert _run(fake, "true", "--no-hot-layer") == 0
    assert "tar -xf" not in (_cell(fake) / "run.sh").read_text()


def test_no_python_tree_no_hot_layer_lines() -> None:
    assert hotlayer.guest_lines(Path("/x.tar"), []) == []
