"""bench/overhead.py without a kernel: what it passes to closewait-trace and what it reads back
from its summary record."""

from __future__ import annotations

import json
from pathlib import Path

from bench import overhead


def test_closewait_arg_ends_the_closewait_command_only() -> None:
    args = overhead.parse_args(["--closewait-arg=--backend=kprobe",
                                "--closewait-arg=--max-sockets=1000"])
    assert args.closewait_arg == ["--backend=kprobe", "--max-sockets=1000"]
    cw = overhead._config("closewait", "/opt/cwt", {}, None, [], args.closewait_arg)
    assert cw is not None
    assert cw.argv == ["/opt/cwt", "--json", "--backend=kprobe", "--max-sockets=1000"]
    assert cw.command.endswith("--json --backend=kprobe --max-sockets=1000")
    floor = overhead._config("empty", "/opt/cwt", {}, None, [], args.closewait_arg)
    assert floor is not None and "--backend=kprobe" not in floor.argv


def test_closewait_arg_defaults_to_none() -> None:
    args = overhead.parse_args([])
    assert args.closewait_arg == []
    cw = overhead._config("closewait", "/opt/cwt", {}, None, [], args.closewait_arg)
    assert cw is not None and cw.argv == ["/opt/cwt", "--json"]


def test_summary_backend_and_accepts_are_recorded(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    summary = {"type": "summary", "backend": "kprobe", "events_lost": 0, "cw_entered": 5,
               "accepts_seen": 1200, "accepts_unmatched": 3, "lost": {}}
    out.write_text(json.dumps({"type": "ready"}) + "\n" + json.dumps(summary) + "\n")
    err.write_text("")
    run = overhead.Run(config="closewait", round=1, position=1)
    overhead._read_outcome(overhead.Config("closewait", "closewait", ["cwt"]), run, out, err, 0)
    assert (run.backend, run.accepts_seen, run.accepts_unmatched) == ("kprobe", 1200, 3)
    assert (run.events_lost, run.cw_entered) == (0, 5)
    row = overhead._per_run([run])[3]
    assert "| kprobe | 1,200 | 3 |" in row
