"""Untrusted text at every human edge: escapes shown, never acted on (issue: terminal injection).

The names are the ones an adversarial run used: a process that calls itself
"\\x1b[2J\\x1b]0;pwned\\x07" cleared the SRE's screen and set the terminal title; one called
"a\\nLEAK forged\\x1b[1A" wrote a forged line; "<script>" goes to the HTML export.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st
from rich.console import Console

from closewait_trace.outputs import textsafe
from closewait_trace.pipeline import timeline
from closewait_trace.pipeline.diagnose import Cause, Confidence, Verdict
from closewait_trace.pipeline.join import Accepted, Change, ChangeKind
from closewait_trace.options import TimelineMode
from closewait_trace.outputs.render import JsonRenderer, LiveRenderer, PlainRenderer, summary_lines
from closewait_trace.outputs.textsafe import visible

from .test_render import NOW, S, SK, open_conn, view

CLEAR = "\x1b[2J\x1b]0;pwned\x07"
FORGE = "a\nLEAK forged\x1b[1A"
SCRIPT = "<script>alert(1)</script>"
MARKUP = "[bold red]x[/]"
BAD_UTF8 = textsafe.decode(b"ev\xffil")
HOSTILE = [CLEAR, FORGE, SCRIPT, MARKUP, BAD_UTF8]
#: What may never reach a terminal from a name: ESC, BEL, CR, LF, other C0/C1 controls.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_visible_escapes_controls_and_keeps_plain_text() -> None:
    assert visible("nginx: worker") == "nginx: worker"
    assert visible("caf\u00e9 \u4e2d\u6587") == "caf\u00e9 \u4e2d\u6587"
    assert visible(CLEAR) == "\\x1b[2J\\x1b]0;pwned\\x07"
    assert visible(FORGE) == "a\\x0aLEAK forged\\x1b[1A"
    assert visible(BAD_UTF8) == "ev\\xffil"
    assert visible(b"x\x9by") == "x\\x9by"  # bytes: decoded, the bad byte shown
    assert visible("a\\x1b") == "a\\x5cx1b"  # a real backslash cannot pass for an escape
    assert visible("\u202eevil") == "\\u202eevil"  # right-to-left override hides text
    assert visible(42) == "42"


@given(st.text())
def test_visible_output_has_no_control_character_and_one_line(text: str) -> None:
    out = visible(text)
    assert not CONTROL.search(out)
    assert "\n" not in out
    out.encode("utf-8")  # always encodable: no lone surrogate survives (raises if one did)


@given(st.binary())
def test_decode_then_visible_never_fails(raw: bytes) -> None:
    assert not CONTROL.search(visible(textsafe.decode(raw)))


def hostile_conn(name: str, i: int = 0) -> Any:
    return open_conn(sk=SK + i, owner_comm=name, accepted=Accepted.NO,
                     flagged_ns=NOW - 5 * S)


def hostile_view(names: list[str]) -> tuple[list[Any], Any]:
    conns = [hostile_conn(n, i) for i, n in enumerate(names)]
    verdicts = {c.key: Verdict(Cause.NEVER_ACCEPTED, Confidence.CERTAIN,
                               f"never accepted: pid 42 ({c.owner_comm}) does not drain",
                               (f"listener held by {c.owner_comm}",)) for c in conns}
    return conns, view(conns, verdicts=verdicts, flagged_total=len(conns))


def assert_safe(text: str) -> None:
    """No control character but our own line breaks, and no forged line."""
    stripped = text.replace("\n", "")
    assert not CONTROL.search(stripped), repr(stripped)
    assert not any(line.startswith("LEAK forged") for line in text.splitlines())


def test_plain_lines_and_summary_show_escapes() -> None:
    conns, v = hostile_view(HOSTILE)
    out = io.StringIO()
    r = PlainRenderer(out)
    r.changes([Change(ChangeKind.FLAGGED, c) for c in conns], v)
    r.notice(f"listener owner {CLEAR}")
    r.finish(v)
    text = out.getvalue()
    assert_safe(text)
    assert "pid=42/\\x1b[2J\\x1b]0;pwned\\x07" in text
    assert "a\\x0aLEAK forged\\x1b[1A" in text
    assert "ev\\xffil" in text
    leak_lines = [x for x in text.splitlines() if "  LEAK  " in x]
    assert len(leak_lines) == len(HOSTILE)  # one line per leak, none forged


def test_plain_timeline_text_shows_escapes() -> None:
    conns, v = hostile_view([FORGE])
    out = io.StringIO()
    PlainRenderer(out, TimelineMode.FLAGGED).changes(
        [Change(ChangeKind.FLAGGED, conns[0])], v)
    assert_safe(out.getvalue())
    assert "a\\x0aLEAK forged" in out.getvalue()


def test_live_view_never_sends_a_name_to_the_terminal() -> None:
    conns, v = hostile_view(HOSTILE)
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True, color_system="truecolor")
    r = LiveRenderer(console)
    r.notice(CLEAR)
    r.ready(v, {"target": "all processes"})
    try:
        r.changes([Change(ChangeKind.FLAGGED, c) for c in conns], v)
        r.refresh(v)
    finally:
        r.finish(v)
    raw = buf.getvalue()
    # rich writes its own SGR colour codes; no other escape sequence may appear, and none of
    # the names' sequences
    assert "\x1b[2J" not in raw and "\x1b]0;" not in raw and "\x07" not in raw
    assert "\x1b[1A" not in raw.replace("\x1b[1A\x1b[2K", "")  # rich's own redraw moves
    assert "\\x1b[2J" in raw and "[bold red]x[/]" in raw  # markup shown, not applied


def test_timeline_exports_escape_html_and_controls(tmp_path: Path) -> None:
    conns, v = hostile_view([SCRIPT + CLEAR])
    for name in ("t.html", "t.svg"):
        ex = timeline.Exporter(tmp_path / name)
        ex.add(conns[0], NOW)
        path = ex.write()
        assert path is not None
        text = path.read_text()
        assert "<script>" not in text and "\x1b" not in text and "\x07" not in text
        assert "script" in text  # shown, escaped for the format


def test_summary_lines_are_one_line_each_when_shown() -> None:
    conns, v = hostile_view(HOSTILE)
    for line in summary_lines(v):
        assert "\n" not in visible(line)
        assert not CONTROL.search(visible(line))


def test_json_keeps_the_true_name_escaped_by_json() -> None:
    conns, v = hostile_view([CLEAR])
    out = io.StringIO()
    JsonRenderer(out).changes([Change(ChangeKind.FLAGGED, conns[0])], v)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert json.loads(out.getvalue())["connection"]["comm"] == CLEAR


def test_snapshot_command_escapes_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from closewait_trace import cli, snapshot
    from closewait_trace.kernel import features

    conns, v = hostile_view(HOSTILE)
    snap = snapshot.Snapshot(taken_ns=NOW, connections=conns, verdicts=v.verdicts,
                             listeners=[])
    monkeypatch.setattr(snapshot, "take", lambda **_kw: snap)
    monkeypatch.setattr(features, "is_privileged", lambda: (True, "running as root"))
    r = CliRunner().invoke(cli.main, ["snapshot", "-v"])
    assert r.exit_code == 0, r.output
    assert_safe(r.output)
    assert "42/\\x1b[2J\\x1b]0;pwned\\x07" in r.output


def test_doctor_escapes_what_it_found(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from closewait_trace import cli, doctor

    checks = [doctor.Check("headers", True, f"/usr/src/{CLEAR}{FORGE}")]
    monkeypatch.setattr(doctor, "doctor_checks", lambda: (checks, 0))
    r = CliRunner().invoke(cli.main, ["doctor"])
    assert r.exit_code == 0
    assert_safe(r.output)
    assert "\\x1b[2J" in r.output


def test_report_of_a_recording_with_hostile_names(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from closewait_trace import cli

    shipped = Path(__file__).parent.parent / "data" / "demo-6.18-tracepoint.cwt"
    hostile = json.dumps(CLEAR + FORGE)
    text = shipped.read_text().replace('"comm":"python"', f'"comm":{hostile}')
    assert hostile in text
    rec = tmp_path / "hostile.cwt"
    rec.write_text(text)
    r = CliRunner().invoke(cli.main, ["report", str(rec), "--timeline"])
    assert r.exit_code == 0, r.output
    assert_safe(r.output)
    assert "\\x1b[2J\\x1b]0;pwned\\x07a\\x0aLEAK forged" in r.output
