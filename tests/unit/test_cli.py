"""The CLI: help texts, option parsing, and one clear line (never a traceback) on errors.

Nothing here loads BPF: the privilege check is made to fail where a test runs the main
command, and a guard turns any attempt to load the probes into a test failure.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner, Result

from closewait_trace import __version__, cli
from closewait_trace.cli import duration_text, main, parse_duration
from closewait_trace.errors import PrivilegeError, UsageError

NS = 1
MS = 1_000_000
S = 1_000_000_000

#: words each known command's --help must contain (what it is for)
PURPOSE = {
    "doctor": "backend",
    "demo": "leaky workload",
    "record": "record",
    "report": "recording",
}


@pytest.fixture(autouse=True)
def _guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the test process's signal handlers, and make loading BPF a test failure."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def no_bpf(*_a: object, **_kw: object) -> None:
        raise AssertionError("a CLI unit test reached Probes.load")

    monkeypatch.setattr("closewait_trace.kernel.attach.Probes.load", no_bpf)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closewait-trace")


def assert_one_error_line(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, (AssertionError, TypeError, AttributeError))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("closewait-trace: error: "), lines[0]
    for n in needles:
        assert n in lines[0]
    return lines[0]


# --- help -----------------------------------------------------------------------------------


def test_main_help_states_its_purpose_and_lists_commands() -> None:
    for flag in ("--help", "-h"):
        r = run(flag)
        assert r.exit_code == 0, r.output
        assert "Trace TCP sockets in CLOSE_WAIT live" in r.output
        for name in main.commands:
            assert name in r.output
        for opt in ("--pid", "--port", "--threshold", "--report-min", "--json", "--duration"):
            assert opt in r.output


def test_every_command_has_help() -> None:
    assert {"doctor", "demo"} <= set(main.commands)
    for name, cmd in main.commands.items():
        assert cmd.help and cmd.help.strip(), f"command {name} has no help text"
        r = run(name, "--help")
        assert r.exit_code == 0, (name, r.output)
        first = " ".join(cmd.help.strip().split("\n\n")[0].split())
        assert first in " ".join(r.output.split()), name
        if name in PURPOSE:
            assert PURPOSE[name] in r.output, name
        r2 = run(name, "-h")
        assert r2.exit_code == 0 and r2.output == r.output


def test_every_option_of_the_main_command_has_help() -> None:
    for p in main.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.help, f"option {p.opts} has no help"


def test_version() -> None:
    r = run("--version")
    assert r.exit_code == 0
    assert r.output.strip() == f"closewait-trace, version {__version__}"


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ns",
    [
        ("500ms", 500 * MS),
        ("10s", 10 * S),
        ("2m", 120 * S),
        ("1h", 3_600 * S),
        ("1.5", 1_500 * MS),
        ("1", 1 * S),
        (" 250 ms ", 250 * MS),
        ("750us", 750_000),
        ("20ns", 20 * NS),
        ("0.25s", 250 * MS),
    ],
)
def test_parse_duration_accepts(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "   ", "-1s", "abc", "0", "0s", "0.0", "10 parsecs", "1e3",
                                  "s", "5sec", "1m30s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration(text)


def test_parse_duration_rejects_what_rounds_to_zero() -> None:
    with pytest.raises(UsageError):
        parse_duration("0.5ns")


@pytest.mark.parametrize("ns, text", [(10 * S, "10s"), (200 * MS, "200ms"), (90 * S, "90s"),
                                      (120 * S, "2m"), (1_500, "1500ns")])
def test_duration_text_is_the_largest_whole_unit_and_reads_back(ns: int, text: str) -> None:
    assert duration_text(ns) == text
    assert parse_duration(text) == ns


@pytest.mark.parametrize("opt", ["--threshold", "--report-min", "--duration"])
def test_bad_duration_options_are_click_usage_errors(opt: str) -> None:
    r = run(opt, "abc")
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert f"Invalid value for '{opt}'" in r.stderr
    assert "bad duration 'abc'" in r.stderr


# --- option errors --------------------------------------------------------------------------


def test_threshold_below_report_min_is_one_line_exit_2(not_root: None) -> None:
    r = run("--threshold", "1s", "--report-min", "2s")
    line = assert_one_error_line(r, 2, "--threshold", "--report-min")
    assert line == "closewait-trace: error: --threshold must not be shorter than --report-min"
    assert r.stdout == ""


def test_threshold_below_default_report_min(not_root: None) -> None:
    assert_one_error_line(run("--threshold", "100ms"), 2, "--threshold")


@pytest.mark.parametrize("port", ["0", "70000", "-1", "http"])
def test_bad_port_rejected_by_click(port: str) -> None:
    r = run("--port", port)
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert "Invalid value for '--port'" in r.stderr


@pytest.mark.parametrize("pid", ["0", "-5", str(2**22 + 1), "9" * 400])
def test_bad_pid_rejected_by_click(pid: str) -> None:
    r = run("-p", pid)
    assert r.exit_code == 2 and "Invalid value for '-p'" in r.stderr
    assert "Traceback" not in r.output


def test_non_numeric_pid_rejected_by_click() -> None:
    r = run("-p", "nginx")
    assert r.exit_code == 2 and "Invalid value for '-p'" in r.stderr


def test_unknown_pid(not_root: None) -> None:
    pid = int(open("/proc/sys/kernel/pid_max").read()) + 1  # above this machine's pid_max
    line = assert_one_error_line(run("-p", str(pid)), 2)
    assert line == f"closewait-trace: error: no process with PID {pid}"


# --- privileges -----------------------------------------------------------------------------


def test_not_root_is_one_clear_line(not_root: None) -> None:
    r = run("--plain")
    line = assert_one_error_line(r, PrivilegeError.exit_code, "needs privileges", "not root")
    assert r.exit_code != 0
    assert line == ("closewait-trace: error: closewait-trace needs privileges to load BPF"
                    " programs: not root")
    assert r.stdout == ""


def test_not_root_with_json_output(not_root: None) -> None:
    r = run("--json", "--port", "8080", "--duration", "1s")
    assert_one_error_line(r, PrivilegeError.exit_code, "not root")


def test_not_root_record_command(not_root: None, tmp_path: object) -> None:
    if "record" not in main.commands:
        pytest.skip("no record command")
    r = run("record", "-o", f"{tmp_path}/trace.jsonl", "--plain")
    assert_one_error_line(r, PrivilegeError.exit_code, "not root")


def test_errors_map_to_their_exit_codes() -> None:
    @click.command()
    def boom() -> None:
        with cli.edge():
            raise UsageError("bad thing")

    r = CliRunner().invoke(boom, [])
    assert r.exit_code == 2
    assert r.stderr == "closewait-trace: error: bad thing\n"
