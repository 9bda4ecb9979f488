"""Soak: closewait-trace (unfiltered, --json) under continuous churn with leaks, for a bounded
time. Rounds of about 20 s: fresh servers, two clients making connections as fast as they
can (one closing first, one letting the server close first), a few leaks of every kind
(accepted and never closed, outbound never closed, never accepted); once the leaks are past
the threshold the round's processes are killed, which closes every leak. The tracer's RSS is
sampled every 5 s.

    sudo .venv/bin/python -m bench.soak                   # 10 minutes
    sudo .venv/bin/python -m bench.soak --minutes 2 -o /tmp/soak.md

Targets: RSS after the warm-up does not grow, no event lost, every leak flagged and no other
connection. Exit codes: 0 met, 1 missed (the report says which), 2 set-up error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .load import Option, Role, find_closewait, run_command, status_kb
from .tracer import JsonTracer


OPTIONS: tuple[Option, ...] = (
    ("--minutes", float, 10.0, "duration"),
    ("--warmup", float, 120.0, "seconds before RSS counts"),
    ("--count", int, 15_000, "connections per client per round"),
    ("--leak-every", int, 5000, "one leak per this many connections"),
    ("--threshold", float, 3.0, "leak threshold, s"),
    ("--rss-slack", float, 2.0, "RSS growth after the warm-up still called flat, MB"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("soak", __doc__, OPTIONS, argv, run, report)


def one_round(count: int, leak_every: int, threshold: float) -> tuple[list[tuple[str, str]], int]:
    """One round; returns the leaks it made and the number of connections."""
    roles: list[Role] = []
    try:
        echo = Role(["server", "--mode", "echo-close"]).start()
        closer = Role(["server", "--mode", "close-now"]).start()
        lst = Role(["listen", "--backlog", "64"]).start()
        roles += [echo, closer, lst]
        clients = [
            Role(["churn", "--port", str(echo.port), "--count", str(count),
                  "--mode", "client-first", "--leak-every", str(leak_every)]).start(),
            Role(["churn", "--port", str(closer.port), "--count", str(count),
                  "--mode", "server-first", "--leak-every", str(leak_every)]).start(),
            Role(["connect-close", "--port", str(lst.port), "--count", "2"]).start(),
        ]
        roles += clients
        for c in clients:
            c.wait_done(600)
        time.sleep(threshold + 2.5)  # every leak past the threshold, and flagged
        leaks = [leak for r in roles for leak in r.leaked()]
        return leaks, 2 * count + 2
    finally:
        for r in roles:
            r.stop()


class RssSampler:
    """The tracer's RSS every 5 s, in a thread: (seconds since start, MB)."""

    def __init__(self, pid: int, start: float) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._pid, self._start = pid, start
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = status_kb(self._pid, "VmRSS")
            if kb is not None:
                self.samples.append((time.monotonic() - self._start, kb / 1024))
            self._stop.wait(5)

    def stop(self) -> None:
        self._stop.set()


def _churn(args: argparse.Namespace, start: float, rss: RssSampler
           ) -> tuple[Counter[tuple[str, str]], int, int]:
    """Rounds until the time is up: the leaks made, the rounds, the connections."""
    expected: Counter[tuple[str, str]] = Counter()
    rounds = conns = 0
    while time.monotonic() < start + args.minutes * 60:
        leaks, n = one_round(args.count, args.leak_every, args.threshold)
        expected.update(leaks)
        rounds += 1
        conns += n
        print(f"[soak {time.monotonic() - start:6.0f} s] round {rounds}: {n:,} connections, "
              f"{len(leaks)} leaks; tracer RSS {rss.samples[-1][1] if rss.samples else 0:.0f} MB",
              file=sys.stderr)
    time.sleep(3)
    return expected, rounds, conns


def _misses(res: dict[str, Any], t: JsonTracer, expected: Counter[tuple[str, str]],
            after: list[float], rss_slack: float) -> list[str]:
    misses = []
    if res["missed"]:
        misses.append(f"{len(expected - t.leaks)} leaks not flagged, e.g. {res['missed'][:3]}")
    if res["extra"]:
        misses.append(f"{len(t.leaks - expected)} connections flagged that were no leak, "
                      f"e.g. {res['extra'][:3]}")
    if res["events_lost"] != 0:
        misses.append(f"events lost: {res['lost']}")
    if after and after[-1] - after[0] > rss_slack:
        misses.append(f"RSS grew {after[-1] - after[0]:.1f} MB after the warm-up "
                      f"(slack {rss_slack:g} MB)")
    if not after:
        misses.append("no RSS sample after the warm-up: run longer than --warmup")
    return misses


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    cw = args.closewait_trace or find_closewait()
    t = JsonTracer([cw, "--json", "--threshold", f"{args.threshold:g}s"]).start()
    try:
        t.wait_ready(300)
    except AssertionError as exc:
        t.stop()
        raise RuntimeError(f"the tracer did not become ready: {exc}") from None
    start = time.monotonic()
    rss = RssSampler(t.pid, start)
    cpu0 = t.cpu_s()
    try:
        expected, rounds, conns = _churn(args, start, rss)
    finally:
        rss.stop()
        cpu1 = t.cpu_s()
        wall = time.monotonic() - start
        t.stop()
    s = t.summary or {}
    after = [mb for ts, mb in rss.samples if ts >= args.warmup]
    missed = sorted((expected - t.leaks).elements())[:10]
    res: dict[str, Any] = {
        "minutes": args.minutes, "warmup_s": args.warmup, "threshold_s": args.threshold,
        "rounds": rounds, "connections": conns, "wall_s": wall,
        "cpu_pct": 100 * (cpu1 - cpu0) / wall if wall else 0.0,
        "leaks_made": sum(expected.values()), "leaks_flagged": t.leak_count,
        "missed": missed,
        "missed_records": {f"{k[0]} {k[1]}": t.closed.get(k, []) for k in missed},
        "extra": sorted((t.leaks - expected).elements())[:10],
        "rss_first_after_warmup": after[0] if after else None,
        "rss_last": after[-1] if after else None,
        "rss_min": min(after) if after else None, "rss_max": max(after) if after else None,
        "rss_peak": (s.get("tracer") or {}).get("peak_rss_mb"),
        "tick_s_max": (s.get("tracer") or {}).get("tick_s_max"),
        "events_lost": s.get("events_lost"), "lost": s.get("lost"),
        "cw_entered": s.get("cw_entered"), "flagged": s.get("flagged"),
        "closed_by": s.get("closed_by"), "open_at_end": s.get("open"),
        "samples": rss.samples,
    }
    return res, _misses(res, t, expected, after, args.rss_slack)


def report(res: dict[str, Any], misses: list[str], argv: Sequence[str]) -> str:
    def f(x: Any, fmt: str = "{:.1f}") -> str:
        return "–" if x is None else fmt.format(x)

    samples = res["samples"]
    per_min = [(ts, mb) for i, (ts, mb) in enumerate(samples) if i % 12 == 0] + samples[-1:]
    lines = [
        "# closewait-trace soak run",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; "
        f"kernel {platform.release()}; {os.cpu_count()} CPUs",
        f"- Command: `python -m bench.soak {' '.join(argv)}`",
        f"- {res['wall_s'] / 60:.1f} min, {res['rounds']} rounds, {res['connections']:,} "
        f"connections ({res['connections'] / res['wall_s']:,.0f}/s); tracer unfiltered, "
        f"`--json`, threshold {res['threshold_s']:g} s",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| leaks made / flagged | {res['leaks_made']} / {res['leaks_flagged']} |",
        f"| sockets that entered CLOSE_WAIT (host) | {f(res['cw_entered'], '{:,}')} |",
        f"| events lost | {res['events_lost']} |",
        f"| tracer RSS after warm-up ({res['warmup_s']:.0f} s): first / last / min / max, MB | "
        f"{f(res['rss_first_after_warmup'])} / {f(res['rss_last'])} / {f(res['rss_min'])} / "
        f"{f(res['rss_max'])} |",
        f"| tracer peak RSS, MB | {f(res['rss_peak'])} |",
        f"| tracer CPU, % of one core | {res['cpu_pct']:.1f} |",
        f"| longest tick, s | {f(res['tick_s_max'], '{:.3f}')} |",
        f"| left CLOSE_WAIT, by how | {res['closed_by']} |",
        "",
        *([f"Leaks not flagged, and what the tracer said of them: {res['missed_records']}", ""]
          if res["missed_records"] else []),
        "RSS over time (s: MB): " + ", ".join(f"{ts:.0f}: {mb:.1f}" for ts, mb in per_min),
        "",
        "Targets (RSS flat after warm-up, nothing lost, every leak flagged and nothing else): "
        + ("all met" if not misses else "MISSED: " + "; ".join(misses)),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
