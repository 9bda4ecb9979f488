"""Hostile input and faults, kernel-free: every bad value and unwritable output is one line
before anything is compiled; recordings survive write errors; `report` is bounded.

Each test here failed before its fix (the adversarial run's findings 4, 5, 6, 9 and 10)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from closewait_trace import cli
from closewait_trace.facts import enrich
from closewait_trace.errors import UsageError
from closewait_trace.outputs.record import MAX_LINE, RecordingWorld, open_replay
from closewait_trace.world import WorldEnded

from .test_cli import assert_one_error_line
from .test_record import _header


def run(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args), prog_name="closewait-trace")


# --- numbers and paths, before the compile ---------------------------------------------------


@pytest.mark.parametrize("opt", ["--threshold", "--report-min", "--duration"])
def test_overlong_durations_are_one_line(opt: str) -> None:
    for text in ("9" * 400, "9" * 400 + ".5ms", "1" + "0" * 30 + "h", "99999999h"):
        r = run(opt, text)
        assert r.exit_code == 2, (text, r.output)
        assert "Traceback" not in r.output and "Overflow" not in r.output
        assert "bad duration" in r.stderr


def test_overlong_demo_threshold_is_one_line() -> None:
    r = run("demo", "--threshold", "9" * 400)
    assert r.exit_code == 2 and "bad duration" in r.stderr


def test_export_into_a_missing_folder_fails_before_the_compile(not_root: None,
                                                              tmp_path: Path) -> None:
    r = run("--timeline-export", str(tmp_path / "missing" / "x.html"))
    assert_one_error_line(r, 73, "--timeline-export", "no folder")


def test_export_into_an_unwritable_folder(not_root: None, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = "/proc/x.html"  # no file can be made there, even by root
    else:
        target = str(tmp_path / "ro" / "x.html")
        (tmp_path / "ro").mkdir(mode=0o500)
    assert_one_error_line(run("--timeline-export", target), 73, "--timeline-export")


@pytest.mark.parametrize("value", ["nope", "127.0.0.1:99999", "[::1]:0", ":", "9" * 400])
def test_bad_metrics_address_fails_before_the_compile(not_root: None, value: str) -> None:
    assert_one_error_line(run("--metrics", value), 2, "--metrics")


def test_metrics_port_in_use_fails_before_the_compile(not_root: None) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_error_line(run("--metrics", str(port)), 2, "Address already in use")


def test_unwritable_recording_fails_before_the_compile(not_root: None, tmp_path: Path) -> None:
    r = run("record", "-o", str(tmp_path / "missing" / "t.cwt"))
    assert_one_error_line(r, 73, "cannot write")


# --- -p targets -----------------------------------------------------------------------------


def test_kernel_thread_is_refused(not_root: None) -> None:
    assert_one_error_line(run("-p", "2"), 2, "kernel thread")  # kthreadd


@pytest.fixture
def zombie() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state, _ = enrich.parse_stat_target(Path(f"/proc/{proc.pid}/stat").read_bytes())
        if state == "Z":
            break
        time.sleep(0.02)
    yield proc.pid
    proc.wait()


def test_zombie_is_refused(not_root: None, zombie: int) -> None:
    assert_one_error_line(run("-p", str(zombie)), 2, "zombie")


def test_thread_id_stands_for_its_process(not_root: None) -> None:
    ready = threading.Event()
    tid: list[int] = []

    def body() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        time.sleep(2)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready.wait(5)
    r = run("--plain", "-p", str(tid[0]))
    assert f"PID {tid[0]} is a thread of process {os.getpid()}" in r.output
    assert r.exit_code == 77  # then the privilege check, as for the process itself


def test_resolve_target_unknown_pid() -> None:
    with pytest.raises(UsageError, match="no process"):
        enrich.resolve_target(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)


# --- recordings -----------------------------------------------------------------------------


class _Inner:
    """The smallest World for the recorder: it only answers the clock and checkpoints."""

    def now_ns(self) -> int:
        return 1

    def checkpoint(self, stop: bool) -> bool:
        return stop

    def close(self) -> None:
        pass


def test_recording_on_a_full_disk_stops_the_recording_not_the_trace() -> None:
    told: list[str] = []
    out = open("/dev/full", "w", encoding="utf-8")
    rec = RecordingWorld(_Inner(), out, options={}, info={},  # type: ignore[arg-type]
                         on_error=told.append)
    for _ in range(3):
        assert rec.now_ns() == 1  # the trace goes on
        assert rec.checkpoint(False) is False
    rec.close()
    with pytest.raises(OSError):
        out.close()  # what is still buffered cannot be written either: the CLI ignores it
    assert rec.error is not None and "No space left on device" in rec.error
    assert len(told) == 1 and "tracing goes on" in told[0]
    assert rec.records_dropped >= 4  # everything after the first failed flush


def test_recording_is_flushed_every_tick(tmp_path: Path) -> None:
    path = tmp_path / "t.cwt"
    with open(path, "w", encoding="utf-8") as out:
        rec = RecordingWorld(_Inner(), out, options={}, info={})  # type: ignore[arg-type]
        rec.now_ns()
        rec.checkpoint(False)
        # not closed: what a SIGKILL leaves behind
        lines = path.read_text().splitlines()
    assert len(lines) == 3 and '"k":"stop"' in lines[-1]


def test_report_of_dev_zero_is_bounded_and_names_the_line() -> None:
    r = run("report", "/dev/zero")
    assert r.exit_code == 65
    assert f"longer than {MAX_LINE >> 20} MiB" in r.stderr
    assert "/dev/zero:1" in r.stderr


def test_report_of_an_endless_record_line_names_it(tmp_path: Path) -> None:
    p = tmp_path / "long.cwt"
    with open(p, "w") as f:
        f.write(_header() + "\n")
        f.write('{"k":"now","v":1}\n')
        f.write("x" * (MAX_LINE + 10))
    world = open_replay(p)
    assert world.now_ns() == 1
    with pytest.raises(WorldEnded):
        world.now_ns()
    assert world.error is not None and world.error.endswith(
        "long.cwt:3: line longer than 64 MiB (not a recording?)")
    r = run("report", str(p))
    assert r.exit_code == 65 and "long.cwt:3" in r.stderr and "Traceback" not in r.output


# --- the edge -------------------------------------------------------------------------------


def test_write_errors_on_stdout_are_one_line() -> None:
    import click

    @click.command()
    def full() -> None:
        with cli.edge():
            raise OSError(errno.ENOSPC, "No space left on device")

    r = CliRunner().invoke(full, [])
    assert r.exit_code == cli.EXIT_OUTPUT
    assert r.stderr == "closewait-trace: error: cannot write the output: No space left on device\n"


def test_broken_pipe_exits_quietly_with_the_documented_status() -> None:
    code = ("from closewait_trace import cli\n"
            "with cli.edge():\n"
            "    raise BrokenPipeError(32, 'Broken pipe')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == cli.EXIT_BROKEN_PIPE == 128 + signal.SIGPIPE
    assert p.stderr == "" and p.stdout == ""


def test_json_stream_owns_stdout_and_fd1_goes_to_stderr() -> None:
    code = ("import os, sys\n"
            "from closewait_trace import cli\n"
            "s = cli._json_stream()\n"
            "os.write(1, b'bcc noise\\n')\n"
            "print('print noise')\n"
            "s.write('{}\\n')\n"
            "assert not s.line_buffering  # the renderer flushes: once per tick, not per line\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "{}\n"
    assert "bcc noise" in p.stderr and "print noise" in p.stderr


def test_io_helpers_do_not_hide_other_errors() -> None:
    import click

    @click.command()
    def other() -> None:
        with cli.edge():
            raise OSError(errno.EACCES, "Permission denied", "/x")

    r = CliRunner().invoke(other, [])
    assert isinstance(r.exception, PermissionError)  # not passed off as an output error


@pytest.mark.parametrize("key", ["wall_offset_ns", "backend"])
def test_report_of_a_header_with_bad_start_information(tmp_path: Path, key: str) -> None:
    """Found by the fuzzer: a null in the header's start information was a TypeError."""
    import json

    shipped = (Path(__file__).parent.parent / "data" / "demo-6.18-tracepoint.cwt").read_text()
    first, rest = shipped.split("\n", 1)
    header = json.loads(first)
    header["info"][key] = None if key == "wall_offset_ns" else {"not": "text"}
    p = tmp_path / "bad.cwt"
    p.write_text(json.dumps(header) + "\n" + rest)
    r = run("report", str(p))
    assert r.exit_code in (0, 65), (r.output, repr(r.exception))
    assert "Traceback" not in r.output
