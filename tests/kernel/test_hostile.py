"""Hostile input and faults against the real tracer: a leaking process with a terminal-attacking
name, a tracer killed with SIGKILL while recording, a full disk, a reader that goes away, a
broken header tree with --json, and an unprivileged user.

Userspace behaviour on the host's kernel (host_only): the kernel side is the same everywhere."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import BACKEND, START_TIMEOUT

pytestmark = [pytest.mark.kernel, pytest.mark.host_only]

CLEAR = "\x1b[2J\x1b]0;pwned\x07"  # 14 bytes: fits the kernel's 15-byte comm
FORGE = "a\nLEAK forged\x1b["  # 15 bytes
#: How each name must be shown: its escapes, on the one line.
SHOWN = {CLEAR: "\\x1b[2J\\x1b]0;pwned\\x07", FORGE: "a\\x0aLEAK forged\\x1b["}
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Renames itself (prctl PR_SET_NAME), listens twice: one listener never accepts, the other
# accepts and never closes. Prints both ports.
HOSTILE_SERVER = """
import ctypes, socket, sys, threading, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
never = socket.socket(); never.bind(("127.0.0.1", 0)); never.listen(8)
keeps = socket.socket(); keeps.bind(("127.0.0.1", 0)); keeps.listen(8)
print(never.getsockname()[1], keeps.getsockname()[1], flush=True)
held = []
while True:
    c, _ = keeps.accept(); held.append(c)
"""


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "closewait_trace", *args]


@pytest.fixture
def hostile_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, int, int]]:
    name = getattr(request, "param", CLEAR)
    proc = subprocess.Popen([sys.executable, "-c", HOSTILE_SERVER, name],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    never, keeps = (int(x) for x in proc.stdout.readline().split())
    yield name, proc.pid, never, keeps
    proc.kill()
    proc.wait()


def _leak_into(never: int, keeps: int) -> None:
    """A client that connects to both listeners and closes: the server side sits in
    CLOSE_WAIT, never accepted on one, accepted and never closed on the other."""
    for port in (never, keeps):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.close()


def _wait_for_lines(proc: subprocess.Popen[str], want: int, word: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline and sum(word in x for x in lines) < want:
        chunk = proc.stdout.readline()
        if chunk:
            lines.append(chunk)
        else:
            time.sleep(0.05)
    return lines


@pytest.mark.parametrize("hostile_server", [CLEAR, FORGE], indirect=True)
def test_hostile_name_recorded_killed_and_reported(
        hostile_server: tuple[str, int, int, int], tmp_path: Path) -> None:
    """Plain lines show the name's escapes; a SIGKILLed recording reads back to its last
    tick; the run leaves no file in TMPDIR."""
    name, pid, never, keeps = hostile_server
    rec, tmpdir = tmp_path / "t.cwt", tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        _cmd("record", "-o", str(rec), "--plain", "--backend", BACKEND, "--threshold", "1s",
             "--port", str(never), "--port", str(keeps)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TMPDIR": str(tmpdir)})
    try:
        ready = _wait_for_lines(proc, 1, "tracing", START_TIMEOUT)
        assert any("tracing" in x for x in ready), ready
        _leak_into(never, keeps)
        lines = ready + _wait_for_lines(proc, 2, "  LEAK  ", 30)
        time.sleep(0.5)  # at least one more tick: flushed
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    leaks = [x for x in lines if "  LEAK  " in x]
    assert len(leaks) == 2, text
    assert not CONTROL.search(text.replace("\n", "")), repr(text)
    assert not any(x.startswith("LEAK forged") for x in text.splitlines())
    assert all(f"pid={pid}/{SHOWN[name]}" in x for x in leaks), leaks
    assert list(tmpdir.iterdir()) == []  # no BCC log or any other file left behind

    report = subprocess.run(_cmd("report", str(rec)), capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 65, report.stderr  # cut short by SIGKILL, and says so
    assert "ends early" in report.stderr and len(report.stderr.splitlines()) == 1
    assert report.stdout.count("  LEAK  ") == 2, report.stdout
    assert not CONTROL.search(report.stdout.replace("\n", ""))


def test_recording_to_a_full_disk_goes_on_without_it(
        hostile_server: tuple[str, int, int, int]) -> None:
    _name, _pid, never, keeps = hostile_server
    proc = subprocess.Popen(
        _cmd("record", "-o", "/dev/full", "--plain", "--backend", BACKEND, "--threshold", "1s",
             "--port", str(never), "--port", str(keeps)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _wait_for_lines(proc, 1, "tracing", START_TIMEOUT)  # the first write may fail
        _leak_into(never, keeps)                                    # before ready already
        lines += _wait_for_lines(proc, 2, "  LEAK  ", 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    text = "".join(lines) + out
    assert text.count("  LEAK  ") == 2  # tracing went on
    assert "recording stopped: No space left on device; tracing goes on without it" in text
    assert "Summary after" in text
    assert proc.returncode == 73
    assert err.splitlines() == [err.splitlines()[-1]] and "/dev/full" in err
    assert "Traceback" not in err


def test_json_reader_going_away_is_quiet(tmp_path: Path) -> None:
    err = tmp_path / "err"
    script = (f"{' '.join(_cmd('--json', '--backend', BACKEND))} --duration 4s 2>{err}"
              " | head -1; echo ${PIPESTATUS[0]}")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                       timeout=START_TIMEOUT + 60)
    first, status = p.stdout.splitlines()
    json.loads(first)
    assert status == "141"  # documented: 128 + SIGPIPE
    assert err.read_text() == ""


def test_json_stdout_is_only_json_when_bcc_fails(tmp_path: Path) -> None:
    broken = tmp_path / "headers"
    (broken / "include" / "linux").mkdir(parents=True)
    (broken / "include" / "linux" / "kconfig.h").write_text("#error broken tree\n")
    p = subprocess.run(_cmd("--json", "--backend", BACKEND, "--kernel-headers", str(broken),
                            "--duration", "1s"),
                       capture_output=True, text=True, timeout=START_TIMEOUT)
    assert p.returncode != 0
    for line in p.stdout.splitlines():
        json.loads(line)  # nothing but JSON, whatever BCC printed
    assert p.stderr.strip().splitlines()[-1].startswith("closewait-trace: error: ")


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=-all", sys.executable, "-m", "closewait_trace", *args],
                          capture_output=True, text=True, timeout=120, cwd="/")


def test_unprivileged_doctor_and_snapshot_say_so() -> None:
    doctor = _as_nobody("doctor")
    assert doctor.returncode == 77, doctor.stdout + doctor.stderr
    assert "needs root" in doctor.stdout
    assert "not mounted" not in doctor.stdout and "Linux 4.16" not in doctor.stdout
    snap = _as_nobody("snapshot")
    assert snap.returncode == 77
    assert snap.stdout == ""
    assert snap.stderr.startswith("closewait-trace: error: snapshot needs root")
    assert len(snap.stderr.splitlines()) == 1
