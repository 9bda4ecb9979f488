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

from .load import JsonTracer, Role, find_closewait, run_command
from .scale import status_kb


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


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    cw = args.closewait_trace or find_closewait()
    t = JsonTracer([cw, "--json", "--threshold", f"{args.threshold:g}s"])
    if not t.ready.wait(300):
        t.stop()
        raise RuntimeError("the tracer did not become ready: " +
                           (t.proc.stderr.read()[-2000:] if t.proc.stderr else ""))
    start = time.monotonic()
    end = start + args.minutes * 60
    samples: list[tuple[float, float]] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            kb = status_kb(t.proc.pid, "VmRSS")
            if kb is not None:
                samples.append((time.monotonic() - start, kb / 1024))
            stop_sampling.wait(5)

    threading.Thread(target=sample, daemon=True).start()
    cpu0 = t.cpu_s()
    expected: Counter[tuple[str, str]] = Counter()
    rounds = conns = 0
    try:
        while time.monotonic() < end:
            leaks, n = one_round(args.count, args.leak_every, args.threshold)
            expected.update(leaks)
            rounds += 1
            conns += n
            print(f"[soak {time.monotonic() - start:6.0f} s] round {rounds}: {n:,} connections, "
                  f"{len(leaks)} leaks; tracer RSS {samples[-1][1] if samples else 0:.0f} MB",
                  file=sys.stderr)
        time.sleep(3)
    finally:
        stop_sampling.set()
        cpu1 = t.cpu_s()
        wall = time.monotonic() - start
        t.stop()
    s = t.summary or {}
    after = [mb for ts, mb in samples if ts >= args.warmup]
    res: dict[str, Any] = {
        "minutes": args.minutes, "warmup_s": args.warmup, "threshold_s": args.threshold,
        "rounds": rounds, "connections": conns, "wall_s": wall,
        "cpu_pct": 100 * (cpu1 - cpu0) / wall if wall else 0.0,
        "leaks_made": sum(expected.values()), "leaks_flagged": t.leak_count,
        "missed": sorted((expected - t.leaks).elements())[:10],
        "missed_records": {f"{k[0]} {k[1]}": t.closed.get(k, [])
                           for k in sorted((expected - t.leaks).elements())[:10]},
        "extra": sorted((t.leaks - expected).elements())[:10],
        "rss_first_after_warmup": after[0] if after else None,
        "rss_last": after[-1] if after else None,
        "rss_min": min(after) if after else None, "rss_max": max(after) if after else None,
        "rss_peak": (s.get("tracer") or {}).get("peak_rss_mb"),
        "tick_s_max": (s.get("tracer") or {}).get("tick_s_max"),
        "events_lost": s.get("events_lost"), "lost": s.get("lost"),
        "cw_entered": s.get("cw_entered"), "flagged": s.get("flagged"),
        "closed_by": s.get("closed_by"), "open_at_end": s.get("open"),
        "samples": samples,
    }
    misses = []
    if res["missed"]:
        misses.append(f"{len(expected - t.leaks)} leaks not flagged, e.g. {res['missed'][:3]}")
    if res["extra"]:
        misses.append(f"{len(t.leaks - expected)} connections flagged that were no leak, "
                      f"e.g. {res['extra'][:3]}")
    if s.get("events_lost") != 0:
        misses.append(f"events lost: {s.get('lost')}")
    if after and after[-1] - after[0] > args.rss_slack:
        misses.append(f"RSS grew {after[-1] - after[0]:.1f} MB after the warm-up "
                      f"(slack {args.rss_slack:g} MB)")
    if not after:
        misses.append("no RSS sample after the warm-up: run longer than --warmup")
    return res, misses


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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    ap.add_argument("--warmup", type=float, default=120.0,
                    help="seconds before RSS counts (default 120)")
    ap.add_argument("--count", type=int, default=15_000,
                    help="connections per client per round (default 15000)")
    ap.add_argument("--leak-every", type=int, default=5000,
                    help="one leak per this many connections (default 5000)")
    ap.add_argument("--threshold", type=float, default=3.0, help="leak threshold, s (default 3)")
    ap.add_argument("--rss-slack", type=float, default=2.0,
                    help="RSS growth after the warm-up still called flat, MB (default 2)")
    return run_command("soak", ap, argv, run, report)


if __name__ == "__main__":
    sys.exit(main())
