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


def _records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        rec = json.loads(line)
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
