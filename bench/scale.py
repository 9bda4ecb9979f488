"""Scale: 2 x N sockets in CLOSE_WAIT at once (N never accepted, queued on a listener with a
large backlog; N outbound, held by a client whose server closed them), traced by two
closewait-trace instances at the same time, both unfiltered:

- `--json`: when has it flagged every one, with what loss, tick time and memory;
- the live view, in a pseudo-terminal, with `--metrics`: how soon its view counts every
  socket, how long its ticks take (the view refreshes once per tick), that it groups rather
  than scrolls, and its memory.

    sudo .venv/bin/python -m bench.scale                  # N = 10,000
    sudo .venv/bin/python -m bench.scale --count 20000 -o bench/results/scale.md

Raises net.core.somaxconn and tcp_max_syn_backlog for the run (restored after). Exit codes:
0 every target met, 1 a target missed (the report says which), 2 set-up error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .load import SCALE_SYSCTLS, Option, Role, Sysctls, find_closewait, run_command, status_kb
from .tracer import JsonTracer, LiveTracer


OPTIONS: tuple[Option, ...] = (
    ("--count", int, 10_000, "sockets of each kind"),
    ("--threshold", float, 5.0, "leak threshold, s"),
    ("--timeout", float, 120.0, "longest wait past the threshold for every flag, s"),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("scale", __doc__, OPTIONS, argv, run, report)


def bpf_map_bytes(pid: int) -> int:
    """Kernel memory of the BPF maps a process holds (memlock of each map fd)."""
    seen: dict[str, int] = {}
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(fd.path) != "anon_inode:bpf-map":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue
        seen[info.get("map_id", fd.name).strip()] = int(info.get("memlock", "0"))
    return sum(seen.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_tracers(cw: str, thr: float) -> tuple[JsonTracer, LiveTracer]:
    """Both tracers, once ready (the live one: once its /readyz says so)."""
    js = JsonTracer([cw, "--json", "--threshold", f"{thr}s"]).start()
    mport = free_port()
    live = LiveTracer([cw, "--threshold", f"{thr}s", "--metrics", str(mport)], mport).start()
    try:
        js.wait_ready(300)
    except AssertionError as exc:
        raise RuntimeError(f"the --json tracer did not become ready: {exc}") from None
    deadline = time.monotonic() + 300
    while not live.ready():
        if time.monotonic() > deadline or live.proc.poll() is not None:
            raise RuntimeError("the live tracer did not start:\n" + live.text()[-2000:])
        time.sleep(0.5)
    return js, live


def _watch(live: LiveTracer, js: JsonTracer, n: int, t_set: float, until: float,
           res: dict[str, Any]) -> None:
    """Poll the live view's metrics until both tracers have flagged all 2 n sockets (or
    `until`), then a few more ticks; record when and how long its ticks took."""
    live_all_open = live_all_flagged = None
    tick_max = 0.0
    while time.monotonic() < until:
        m = live.metrics() or {}
        now = time.monotonic()
        tick_max = max(tick_max, m.get("tick_max", 0.0))
        if live_all_open is None and m.get("sockets", 0) >= 2 * n:
            live_all_open = now
        if live_all_flagged is None and m.get("leaking", 0) >= 2 * n:
            live_all_flagged = now
        if live_all_flagged and js.first_all_at:
            break
        time.sleep(0.25)
    time.sleep(3)  # a few more ticks with all of them open
    m = live.metrics() or {}
    res["live_tick_max_s"] = max(tick_max, m.get("tick_max", 0.0))
    res["live_open_seen"] = m.get("sockets")
    for key, at in (("live_all_open_after_s", live_all_open),
                    ("live_all_flagged_after_s", live_all_flagged),
                    ("json_all_flagged_after_s", js.first_all_at)):
        res[key] = None if at is None else at - t_set
    res["json_map_kb"] = bpf_map_bytes(js.pid) // 1024
    res["live_rss_mb"] = (status_kb(live.pid, "VmHWM") or 0) / 1024


def _measure(args: argparse.Namespace, res: dict[str, Any]) -> tuple[JsonTracer, LiveTracer]:
    """The run itself: listeners, both tracers, then 2 x N leaks made at once and watched."""
    n, thr = args.count, args.threshold
    roles: list[Role] = []
    js: JsonTracer | None = None
    live: LiveTracer | None = None
    try:
        lst = Role(["listen", "--backlog", str(n + 1000)]).start()
        srv = Role(["server", "--mode", "close-now", "--backlog", str(n + 1000)]).start()
        roles += [lst, srv]
        js, live = _start_tracers(args.closewait_trace or find_closewait(), thr)
        js.want = 2 * n
        t0 = time.monotonic()
        roles.append(Role(["connect-close", "--port", str(lst.port), "--count", str(n)]).start())
        roles.append(Role(["hold", "--port", str(srv.port), "--count", str(n)]).start())
        for r in roles[2:]:
            r.wait_done(600)
        t_set = time.monotonic()
        res["setup_s"] = t_set - t0
        _watch(live, js, n, t_set, t_set + thr + args.timeout, res)
    finally:
        for t in (js, live):
            if t is not None:
                t.stop()
        for r in roles:
            r.stop()
    return js, live


def _misses(res: dict[str, Any], s: dict[str, Any], n: int) -> list[str]:
    misses = []
    if s.get("open", 0) < 2 * n:
        misses.append(f"--json tracer counted {s.get('open')} open, not {2 * n}")
    if s.get("flagged", 0) < 2 * n:
        misses.append(f"--json tracer flagged {s.get('flagged')}, not {2 * n}")
    if s.get("events_lost", 1) != 0:
        misses.append(f"--json tracer lost events: {s.get('lost')}")
    if (res["live_open_seen"] or 0) < 2 * n:
        misses.append(f"live view counted {res['live_open_seen']}, not {2 * n}")
    if res["live_tick_max_s"] > 1.0:
        misses.append(f"live view tick took up to {res['live_tick_max_s']:.2f} s (> 1 s)")
    if not (res["live_grouped"] and res["live_more_line"]):
        misses.append("live view did not group the sockets")
    if not res["live_summary_no_loss"]:
        misses.append("live view's summary does not say 'no events lost'")
    return misses


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    res: dict[str, Any] = {"count": args.count, "threshold_s": args.threshold}
    with Sysctls(SCALE_SYSCTLS):
        js, live = _measure(args, res)
    s = js.summary or {}
    res["json_summary"] = {k: s.get(k) for k in ("open", "flagged", "cw_reported", "events_lost",
                                                "complete", "lost", "tracer")}
    res["json_groups"] = [(g["cause"], g["pid"], g["count"]) for g in s.get("groups", [])]
    text = live.text()
    res["live_grouped"] = "by process and service" in text
    res["live_more_line"] = bool(re.search(r"\.\.\. \d+ more; grouped below", text))
    res["live_summary_no_loss"] = "no events lost" in text
    res["live_tail"] = text[-3000:]
    return res, _misses(res, s, args.count)


def report(res: dict[str, Any], misses: list[str], argv: Sequence[str]) -> str:
    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "–" if x is None else fmt.format(x)

    s = res["json_summary"]
    tr = s.get("tracer") or {}
    lines = [
        "# closewait-trace scale run",
        "",
        f"- Date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; "
        f"kernel {platform.release()}; {os.cpu_count()} CPUs",
        f"- Command: `python -m bench.scale {' '.join(argv)}`",
        f"- Load: {res['count']:,} never-accepted (connect + close into a listener that never "
        f"accepts, backlog {res['count'] + 1000:,}) and {res['count']:,} outbound (held by a "
        f"client after its server closed them), set up in {res['setup_s']:.1f} s; both tracers "
        f"unfiltered, threshold {res['threshold_s']:g} s, default map sizes",
        "",
        "| | --json tracer | live view (pty, --metrics) |",
        "|---|---:|---:|",
        f"| sockets counted in CLOSE_WAIT | {f(s.get('open'), '{:,}')} | "
        f"{f(res['live_open_seen'], '{:,.0f}')} |",
        f"| leaks flagged | {f(s.get('flagged'), '{:,}')} | – |",
        f"| all counted, s after the last connection | – | "
        f"{f(res['live_all_open_after_s'])} |",
        f"| all flagged, s after the last connection (threshold {res['threshold_s']:g} s) | "
        f"{f(res['json_all_flagged_after_s'])} | {f(res['live_all_flagged_after_s'])} |",
        f"| longest tick (view refresh), s | {f(tr.get('tick_s_max'), '{:.3f}')} | "
        f"{f(res['live_tick_max_s'], '{:.3f}')} |",
        f"| peak RSS, MB | {f(tr.get('peak_rss_mb'), '{:.0f}')} | "
        f"{f(res['live_rss_mb'], '{:.0f}')} |",
        f"| BPF map memory, KB | {res['json_map_kb']:,} | (same sizes) |",
        f"| events lost | {s.get('events_lost')} | "
        f"{'0' if res['live_summary_no_loss'] else 'see below'} |",
        "",
        f"Groups (--json summary): {res['json_groups']}",
        "",
        f"Live view grouped (panel 'by process and service' and a '... N more' line): "
        f"{res['live_grouped'] and res['live_more_line']}",
        "",
        "Targets (all counted, view refresh within 1 s, grouped, nothing lost): "
        + ("all met" if not misses else "MISSED: " + "; ".join(misses)),
        "",
        "## End of the live view's terminal output",
        "",
        "```",
        res["live_tail"].strip()[-2500:],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
