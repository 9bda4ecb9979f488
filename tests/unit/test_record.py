"""The recording format, kernel-free: header checks, corrupt and truncated files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from closewait_trace.cli import main
from closewait_trace.kernel.decode import Event, EventType, ExitHow, SockFlag, SockInfo
from closewait_trace.errors import CloseWaitError
from closewait_trace.outputs.record import (
    FORMAT, FORMAT_VERSION, RecordFormatError, RecordingWorld, ReplayWorld, event_from_json,
    event_to_json, open_replay,
)
from closewait_trace.world import Counters, ProcessInfo, WorldEnded


def _header(version: int = FORMAT_VERSION) -> str:
    return json.dumps({"format": FORMAT, "version": version, "options": {
        "threshold_ns": 10**9, "report_min_ns": 10**8}, "info": {"backend": "tracepoint"}})


def _sock(**kw: object) -> SockInfo:
    base = dict(skaddr=0xFFFF0001, ts_first=1, ts_established=2, ts_cw_enter=3, ts_accept=0,
                ts_close=0, owner_tgid=42, closer_tgid=0,
                flags=SockFlag.PASSIVE | SockFlag.OWNER_KNOWN, family=10, laddr="::1",
                lport=80, raddr="::1", rport=5555, owner_comm="srv")
    base.update(kw)
    return SockInfo(**base)  # type: ignore[arg-type]


def test_event_json_round_trip() -> None:
    ev = Event(ts=9, type=EventType.CW_EXIT, tgid=1, tid=2, oldstate=8, newstate=9,
               exit_how=ExitHow.APP_CLOSE, comm="x", sock=_sock())
    assert event_from_json(json.loads(json.dumps(event_to_json(ev)))) == ev


def test_newer_version_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "new.cwt"
    p.write_text(_header(FORMAT_VERSION + 1) + "\n")
    with pytest.raises(RecordFormatError, match="newer"):
        open_replay(p)
    result = CliRunner().invoke(main, ["report", str(p)])
    assert result.exit_code == 65
    assert "newer than this closewait-trace" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("text,match", [
    ("", "empty file"),
    ("hello\n", "not a closewait-trace recording"),
    (json.dumps({"format": "other"}) + "\n", "not a closewait-trace recording"),
])
def test_not_a_recording(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.cwt"
    p.write_text(text)
    with pytest.raises(RecordFormatError, match=match):
        open_replay(p)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope.cwt")])
    assert result.exit_code == 65
    assert result.output.startswith("closewait-trace: error: cannot read")


def test_replay_stops_at_corrupt_line_and_names_it() -> None:
    lines = [_header(), '{"k":"now","v":100}', '{"k":"stop","v":false}',
             '{"k":"events","v":[]}', '{"k":"now","v":BROKEN}']  # noqa: E501
    w = ReplayWorld(io.StringIO("\n".join(lines) + "\n"), "t.cwt")
    assert w.now_ns() == 100
    assert w.checkpoint(False) is False
    assert w.events(0) == []
    with pytest.raises(WorldEnded):
        w.now_ns()
    assert w.error is not None and w.error.startswith("t.cwt:5:")
    assert w.finished()
    with pytest.raises(WorldEnded):  # and stays ended
        w.checkpoint(False)


def test_replay_detects_out_of_sync_record() -> None:
    w = ReplayWorld(io.StringIO(_header() + '\n{"k":"cw","v":{"add":[],"del":[]}}\n'), "t.cwt")
    with pytest.raises(WorldEnded):
        w.now_ns()
    assert w.error is not None and "expected a 'now' record, found 'cw'" in w.error


def test_truncated_last_line_is_reported() -> None:
    w = ReplayWorld(io.StringIO(_header() + '\n{"k":"now","v":1}\n{"k":"no'), "t.cwt")
    assert w.now_ns() == 1
    with pytest.raises(WorldEnded):
        w.checkpoint(False)
    assert w.error is not None and "t.cwt:3:" in w.error and "truncated" in w.error


def test_file_that_ends_between_lines_is_reported() -> None:
    w = ReplayWorld(io.StringIO(_header() + '\n{"k":"now","v":1}\n'), "t.cwt")
    assert w.now_ns() == 1
    with pytest.raises(WorldEnded):
        w.checkpoint(False)
    assert w.error is not None and "t.cwt:3:" in w.error and "ends early" in w.error


def test_header_only_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "h.cwt"
    p.write_text(_header() + "\n")
    result = CliRunner().invoke(main, ["report", str(p)])
    assert result.exit_code == 65
    assert "h.cwt:2:" in result.output and "Traceback" not in result.output


class _FakeWorld:
    """A scripted World for the tee: answers are fixed values, not kernel behaviour."""

    def now_ns(self) -> int: return 5
    def checkpoint(self, stop: bool) -> bool: return stop
    def events(self, timeout_ms: int) -> list[Event]: return []
    def close_wait(self) -> list[SockInfo]: return [_sock()]
    def counters(self) -> Counters: return Counters()
    def diag_close_wait(self) -> list: return []
    def listeners(self) -> list: return []
    def owners(self, inode: int) -> list: return []
    def refresh_owners(self) -> None: pass
    def process(self, pid: int) -> ProcessInfo: return ProcessInfo(pid, True, 3, 1024)
    def descendants(self, pids: object) -> list[int]: return [7]
    def finished(self) -> bool: return False
    def close(self) -> None: pass


def test_recording_replays_the_same_answers() -> None:
    out = io.StringIO()
    rec = RecordingWorld(_FakeWorld(), out, options={"threshold_ns": 1, "report_min_ns": 1},  # type: ignore[arg-type]
                         info={})
    answers = [rec.now_ns(), rec.close_wait(), rec.process(9), rec.descendants([1]),
               rec.counters(), rec.checkpoint(True)]
    rep = ReplayWorld(io.StringIO(out.getvalue()), "x")
    again = [rep.now_ns(), rep.close_wait(), rep.process(9), rep.descendants([1]),
             rep.counters(), rep.checkpoint(False)]
    assert again == answers
    assert rep.error is None


def test_record_errors_are_closewait_errors() -> None:
    assert issubclass(RecordFormatError, CloseWaitError)


class _ChangingWorld(_FakeWorld):
    """Answers a scripted sequence of CLOSE_WAIT maps."""

    def __init__(self, polls: list[list[SockInfo]]) -> None:
        self.polls = polls

    def close_wait(self) -> list[SockInfo]:
        return self.polls.pop(0)


def test_close_wait_polls_are_recorded_as_changes_and_replayed_whole() -> None:
    a = _sock(skaddr=1, ts_cw_enter=10)
    b = _sock(skaddr=2, ts_cw_enter=20)
    b2 = _sock(skaddr=2, ts_cw_enter=20, ts_accept=25,
               flags=SockFlag.PASSIVE | SockFlag.OWNER_KNOWN | SockFlag.ACCEPTED)
    c = _sock(skaddr=1, ts_cw_enter=30)  # address reused by a new stay
    polls = [[b, a], [a, b], [b2, a], [c], []]
    out = io.StringIO()
    rec = RecordingWorld(_ChangingWorld([list(p) for p in polls]), out,  # type: ignore[arg-type]
                         options={}, info={})
    live = [rec.close_wait() for _ in polls]
    lines = out.getvalue().splitlines()[1:]
    deltas = [json.loads(line)["v"] for line in lines]
    assert [len(d["add"]) for d in deltas] == [2, 0, 1, 1, 0]  # unchanged polls add nothing
    assert deltas[3]["del"] == [[1, 10], [2, 20]]
    rep = ReplayWorld(io.StringIO(out.getvalue()), "x")
    assert [rep.close_wait() for _ in polls] == live
    assert live[0] == [a, b]  # key order on both sides
