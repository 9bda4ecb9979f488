"""Shipped recordings, reported with no kernel: the report must say exactly what the live run
said. tests/data/NAME.cwt was recorded with `demo -o`, NAME.live.jsonl is that live run's
--json output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
RECORDINGS = sorted(DATA.glob("*.cwt"))


#: Keys added after the shipped recordings were made (format 1): a format-1 replay knows no
#: namespace or container, so they must be null there; any other value is a difference.
NEWER_KEYS = ("container", "netns", "netns_source")


#: Loss counters added after them: the kernels of those runs had none, so they must be 0.
NEWER_LOSSES = ("pid_map_full", "owner_room_full")
#: Counters of the summary added after them, 0 for the same reason.
NEWER_COUNTS = ("kernel_skipped",)


def _drop_unknown(obj: object) -> None:
    if isinstance(obj, dict):
        for key in NEWER_KEYS:
            if key in obj and obj[key] is None:
                del obj[key]
        for key in NEWER_COUNTS:
            if obj.get(key) == 0:
                del obj[key]
        lost = obj.get("lost")
        if isinstance(lost, dict):
            for key in NEWER_LOSSES:
                if lost.get(key) == 0:
                    del lost[key]
        for value in obj.values():
            _drop_unknown(value)
    elif isinstance(obj, list):
        for value in obj:
            _drop_unknown(value)


def _records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        rec = json.loads(line)
        _drop_unknown(rec)
        if rec["type"] == "notice":
            continue
        rec.pop("timeline_export", None)  # where the live run wrote its HTML
        rec.pop("tracer", None)  # the tracer process's own tick times and memory
        out.append(rec)
    return out


def test_there_are_shipped_recordings() -> None:
    assert RECORDINGS


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_report_of_a_shipped_recording_equals_its_live_run(path: Path) -> None:
    live = _records(path.with_suffix(".live.jsonl").read_text())
    rep = subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert _records(rep.stdout) == live
    kinds = {r["type"] for r in live}
    assert {"ready", "leak", "timeline", "summary"} <= kinds
    causes = {r["connection"]["verdict"]["cause"] for r in live if r["type"] == "leak"}
    assert {"never-accepted", "accepted-not-closed", "outbound-not-closed"} <= causes
