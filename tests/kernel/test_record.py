"""record on a real traced scenario, then report: the same records as the live run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .harness import Server, Tracer

pytestmark = [pytest.mark.kernel, pytest.mark.per_kernel]  # every backend sends the same events


def _records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        rec = json.loads(line)
        rec.pop("_t", None)
        rec.pop("tracer", None)  # the tick times and memory of the process that printed it
        if rec["type"] != "notice":
            out.append(rec)
    return out


def test_report_of_a_recording_equals_the_live_run(tmp_path: Path) -> None:
    never = Server(accept=False).start()
    hold = Server(accept=True, close_after=None).start()
    slow = Server(accept=True, close_after=0.5).start()
    rec_file = tmp_path / "trace.cwt"
    t = Tracer(["-o", str(rec_file), "--threshold", "1s", "--report-min", "100ms",
                "--port", str(never.port), "--port", str(hold.port), "--port", str(slow.port)],
               command="record")
    try:
        t.start()
        for srv in (never, hold, slow):
            c = srv.connect()
            time.sleep(0.3)
            c.close()
        t.wait_for(lambda r: r["type"] == "leak"
                   and r["connection"]["local"].endswith(f":{hold.port}"), 8, what="leak")
        t.wait_for(lambda r: r["type"] == "close"
                   and r["connection"]["local"].endswith(f":{slow.port}"), 8, what="close")
        assert t.stop() == 0
    finally:
        for srv in (never, hold, slow):
            srv.stop()
    live = [{k: v for k, v in r.items() if k not in ("_t", "tracer")} for r in t.records
            if r["type"] != "notice"]
    kinds = [r["type"] for r in live]
    assert kinds.count("leak") >= 2 and "close" in kinds and kinds[-1] == "summary"

    rep = subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json",
                          str(rec_file)], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    assert _records(rep.stdout) == live

    # Cut the file in the middle of a line: the error names the line, and everything
    # before it is still reported.
    data = rec_file.read_text()
    cut = tmp_path / "cut.cwt"
    cut.write_text(data[: int(len(data) * 0.7)])
    rep = subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json",
                          str(cut)], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 65
    lineno = data[: int(len(data) * 0.7)].count("\n") + 1
    assert f"cut.cwt:{lineno}:" in rep.stderr
    assert "Traceback" not in rep.stderr
    partial = _records(rep.stdout)
    assert partial[-1]["type"] == "summary"
    assert [r for r in partial[:-1]] == live[: len(partial) - 1]
