"""Prometheus metrics: one more renderer of the session's Views, served over HTTP.

Every scrape builds its series afresh from the latest View, so a socket that left CLOSE_WAIT
leaves no stale series behind. One prefix (``closewait_``), base units (seconds), ``_total`` on
counters. Labels are bounded: no per-socket or per-PID labels (a restarted server keeps its
series); at most MAX_SERIES series per family, the rest summed under comm="other"; listeners
capped alike. Every label value read from the traced system (process names, container names)
goes through :func:`textsafe.visible`. The table of metrics is in docs/deploy.md.

The same server answers ``/healthz`` (the tracer is alive: compiling, or ticking within
``stale_s``) and ``/readyz`` (attached and tracing). It binds to 127.0.0.1 unless an address is
given, and only there.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..kernel.decode import HIST_BUCKETS, LOSS_SOURCES, Stat
from ..errors import UsageError
from ..pipeline.join import Change, Connection
from .render import EXIT_WORDS, View
from .textsafe import visible

MAX_SERIES = 100
MAX_LISTENERS = 200
PREFIX = "closewait_"
#: How a stay in CLOSE_WAIT ends (the session's words): the label values of closewait_left_total.
LEFT_HOW = (*EXIT_WORDS.values(), "lost")

#: Lost events by source: the kernel's counters, then the exit events the tracker missed.

# The last cgroup path component of a container, for the runtimes of docs/deploy.md.
_CONTAINER_RE = re.compile(
    r"(?:^|[-/])(?:docker|libpod|cri-containerd|crio)-([0-9a-f]{64})(?:\.scope)?$"
    r"|^/(?:docker|kubepods(?:/[a-z]+)?/pod[0-9a-f-]+)/([0-9a-f]{64})$")


def parse_listen(text: str) -> tuple[str, int]:
    """'9466' -> ('127.0.0.1', 9466); 'ADDR:PORT' and '[v6]:PORT' as given."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
    except ValueError:
        raise UsageError(f"bad --metrics {text!r}: use PORT or ADDR:PORT") from None
    if not 0 < n < 65536:
        raise UsageError(f"bad --metrics port {n}")
    return host, n


def container_of_cgroup(path: str) -> str:
    """The short (12 hex) container id in a cgroup path, '' for none (the host)."""
    m = _CONTAINER_RE.search(path.rstrip("/"))
    if not m:
        return ""
    return (m.group(1) or m.group(2))[:12]


class CgroupContainers:
    """PID -> container id from /proc/PID/cgroup (v2 line first), cached per PID."""

    def __init__(self, proc: str = "/proc", limit: int = 4096) -> None:
        self.proc = proc
        self.limit = limit
        self.cache: dict[int, str] = {}

    def __call__(self, pid: int) -> str:
        got = self.cache.get(pid)
        if got is None:
            got = self._read(pid)
            if len(self.cache) >= self.limit:
                self.cache.clear()
            self.cache[pid] = got
        return got

    def _read(self, pid: int) -> str:
        try:
            with open(f"{self.proc}/{pid}/cgroup", encoding="utf-8",
                      errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        lines.sort(key=lambda line: not line.startswith("0::"))
        for line in lines:
            found = container_of_cgroup(line.split(":", 2)[-1])
            if found:
                return found
        return ""


def _cause(view: View, c: Connection) -> str:
    verdict = view.verdicts.get(c.key)
    return verdict.cause.value if verdict else "unknown"


@dataclass(frozen=True)
class _Values:
    """Plain values taken from one View at once: a scrape never mixes two moments."""

    groups: tuple[tuple[tuple[str, ...], int], ...]
    leaks: tuple[tuple[tuple[str, ...], int], ...]
    flagged: int
    left: dict[str, int]
    stats: dict[Stat, int]
    lost_exits: int
    hist: tuple[int, ...]
    accept_errors: dict[int, int]
    listeners: tuple[tuple[int, int, int], ...]
    threshold_s: float
    ticks: int = 0
    slow_ticks: int = 0
    tick_last_s: float = 0.0
    tick_max_s: float = 0.0
    accept_watch_s: float | None = None
    wall_s: float = field(default_factory=time.time)

    @classmethod
    def of(cls, view: View, listeners: Sequence[tuple[int, int, int]],
           container_of: Callable[[int], str]) -> _Values:
        def who(c: Connection) -> tuple[str | None, str | None, int | None]:
            # the enrichment stage's identity where it read one (recorded, replayed)
            known = c.container.label if c.container is not None else None
            return c.owner_comm, known, None if known else c.owner_pid

        def labels(comm: str | None, known: str | None, pid: int | None) -> tuple[str, str]:
            container = known or (container_of(pid) if pid is not None else "")
            return visible(comm or ""), visible(container)

        # counted by raw fields first, then labelled once per distinct owner: thousands of
        # sockets share a few owners, and a label costs a /proc read and an escaping pass
        raw_groups = Counter((*who(c), c.service_port, c.direction.value, c.accepted.value)
                             for c in view.open)
        raw_leaks = Counter((*who(c), c.service_port, _cause(view, c)) for c in view.open
                            if c.flagged_ns is not None)
        groups: Counter[tuple[str, ...]] = Counter()
        for (comm, known, pid, port, direction, accepted), n in raw_groups.items():
            groups[(*labels(comm, known, pid), str(port), direction, accepted)] += n
        leaks: Counter[tuple[str, ...]] = Counter()
        for (comm, known, pid, port, cause), n in raw_leaks.items():
            leaks[(*labels(comm, known, pid), str(port), cause)] += n
        errs: Counter[int] = Counter()
        for (_pid, err), n in view.accept_errors.items():
            errs[err] += n
        tick = view.tick
        return cls(
            groups=tuple(groups.most_common()), leaks=tuple(leaks.most_common()),
            flagged=view.flagged_total, left=dict(view.closed_by_how), stats=dict(view.stats),
            lost_exits=view.lost_exits,
            hist=tuple(view.hist), accept_errors=dict(errs), listeners=tuple(listeners),
            threshold_s=view.threshold_ns / 1e9,
            ticks=tick.ticks if tick else 0, slow_ticks=tick.over_1s if tick else 0,
            tick_last_s=tick.last_ns / 1e9 if tick else 0.0,
            tick_max_s=tick.max_ns / 1e9 if tick else 0.0,
            accept_watch_s=view.accept_watch_s,
        )


@dataclass
class Health:
    """What /healthz, /readyz and the tracer's own series say."""

    node: str = field(default_factory=socket.gethostname)
    backend: str = ""
    kernel: str = field(default_factory=lambda: os.uname().release)
    ready: bool = False
    finished: bool = False
    started_s: float = field(default_factory=time.time)
    stale_s: float = 30.0

    def alive(self, last_tick_s: float | None, now_s: float) -> tuple[bool, str]:
        if self.finished:
            return False, "tracer stopped"
        if not self.ready:
            return True, "starting (compiling and attaching the BPF programs)"
        if last_tick_s is None or now_s - last_tick_s > self.stale_s:
            return False, f"no tick for more than {self.stale_s:g}s"
        return True, "ticking"


class _Collector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        with self.exporter.lock:
            values = self.exporter.values
        yield from _health_series(self.exporter.health, values)
        if values is not None:
            yield from _series(values)


def _m(name: str) -> str:
    return PREFIX + name


def _capped(family: GaugeMetricFamily, rows: Sequence[tuple[tuple[str, ...], int]]) -> None:
    """At most MAX_SERIES series; the rest summed under comm="other", other labels empty."""
    other = 0
    for i, (labels, n) in enumerate(rows):
        if i < MAX_SERIES:
            family.add_metric(list(labels), n)
        else:
            other += n
    if other and rows:
        family.add_metric(["other"] + [""] * (len(rows[0][0]) - 1), other)


def _health_series(health: Health, v: _Values | None) -> Iterator[Metric]:
    info = InfoMetricFamily(_m("tracer"), "The tracer: version, node, backend, kernel.",
                            labels=["version", "node", "backend", "kernel"])
    info.add_metric([__version__, visible(health.node), health.backend or "starting",
                     visible(health.kernel)], {})
    yield info
    up = GaugeMetricFamily(_m("tracer_up"), "1 while the tracer is attached and tracing.")
    up.add_metric([], 1 if health.ready and not health.finished else 0)
    yield up
    if v is None:
        return
    last = GaugeMetricFamily(_m("tracer_last_tick_timestamp_seconds"),
                             "Unix time of the tracer's last completed tick.")
    last.add_metric([], v.wall_s)
    yield last
    ticks = CounterMetricFamily(_m("tracer_ticks"), "The tracer's ticks (poll, join, "
                                "diagnose, render) since start.")
    ticks.add_metric([], v.ticks)
    yield ticks
    slow = CounterMetricFamily(_m("tracer_slow_ticks"), "Ticks that took longer than 1 s.")
    slow.add_metric([], v.slow_ticks)
    yield slow
    for which, value in (("last", v.tick_last_s), ("max", v.tick_max_s)):
        g = GaugeMetricFamily(_m(f"tracer_tick_{which}_seconds"),
                              f"Duration of the tracer's {which} tick"
                              + (" since start." if which == "max" else "."))
        g.add_metric([], value)
        yield g
    thr = GaugeMetricFamily(_m("leak_threshold_seconds"),
                            "Age in CLOSE_WAIT at which a socket is flagged as a leak.")
    thr.add_metric([], v.threshold_s)
    yield thr


def _series(v: _Values) -> Iterator[Metric]:
    now = GaugeMetricFamily(
        _m("sockets"), "Sockets now in CLOSE_WAIT (matching the filters), by owner process"
        " name, container, service port, direction and whether they were accepted.",
        labels=["comm", "container", "port", "direction", "accepted"])
    _capped(now, v.groups)
    yield now

    leaking = GaugeMetricFamily(
        _m("leaking_sockets"), "Sockets now in CLOSE_WAIT for longer than the leak threshold,"
        " by owner process name, container, service port and diagnosed cause.",
        labels=["comm", "container", "port", "cause"])
    _capped(leaking, v.leaks)
    yield leaking

    total = CounterMetricFamily(_m("leaks_flagged"),
                                "Sockets flagged as leaking since the tracer started.")
    total.add_metric([], v.flagged)
    yield total

    entered = CounterMetricFamily(_m("entered"),
                                  "Sockets that entered CLOSE_WAIT on this host (all, unfiltered).")
    entered.add_metric([], v.stats.get(Stat.CW_ENTERED, 0))
    yield entered

    left = CounterMetricFamily(_m("left"), "Sockets matching the filters that left CLOSE_WAIT"
                               " after at least --report-min in it, by how it ended.",
                               labels=["how"])
    for how in LEFT_HOW:
        left.add_metric([how], v.left.get(how, 0))
    yield left

    yield from _histogram(v)
    yield from _accept_series(v)

    lost = CounterMetricFamily(_m("events_lost"), "Events the tracer missed, by source:"
                               " non-zero means its counts are incomplete.", labels=["source"])
    for source, stat in LOSS_SOURCES:
        lost.add_metric([source], v.stats.get(stat, 0))
    lost.add_metric(["exit_events"], v.lost_exits)
    yield lost
    skipped = CounterMetricFamily(
        _m("kernel_skipped_runs"), "Runs of the tracer's BPF programs the kernel skipped (another"
        " program busy on that CPU; a kretprobe out of room): a state change, accept or close"
        " unseen. Not in events_lost: a busy node skips a few in a million.")
    skipped.add_metric([], v.stats.get(Stat.KERNEL_SKIPPED, 0))
    yield skipped


def _histogram(v: _Values) -> Iterator[Metric]:
    buckets: list[tuple[str, float]] = []
    acc = 0
    for i in range(HIST_BUCKETS):
        acc += v.hist[i] if i < len(v.hist) else 0
        # bucket i holds durations with floor(log2(us)) == i, i.e. below 2**(i+1) us
        buckets.append((repr((2 ** (i + 1)) / 1e6), acc))
    buckets.append(("+Inf", acc))
    yield HistogramMetricFamily(
        _m("duration_seconds"),
        "Time sockets matching the filters spent in CLOSE_WAIT before leaving it.",
        buckets=buckets, sum_value=v.stats.get(Stat.CW_NS_SUM, 0) / 1e9)


def _accept_series(v: _Values) -> Iterator[Metric]:
    errs = CounterMetricFamily(_m("accept_errors"),
                               "Failed accept()/accept4() calls by errno (EAGAIN excluded).",
                               labels=["errno"])
    for err, n in sorted(v.accept_errors.items()):
        errs.add_metric([errno_mod.errorcode.get(err, str(err))], n)
    yield errs
    q = GaugeMetricFamily(_m("listener_accept_queue"),
                          "Connections waiting in a listener's accept queue.", labels=["port"])
    b = GaugeMetricFamily(_m("listener_accept_queue_limit"),
                          "A listener's accept queue limit (its backlog).", labels=["port"])
    for port, (queue, backlog) in _per_port(v.listeners).items():
        q.add_metric([str(port)], queue)
        b.add_metric([str(port)], backlog)
    yield q
    yield b
    if v.accept_watch_s is not None:
        watch = CounterMetricFamily(
            _m("accept_watch_seconds"), "Seconds the accept() syscall tracepoints were attached"
            " (tracepoint backend): every syscall on the machine is slower meanwhile.")
        watch.add_metric([], v.accept_watch_s)
        yield watch


def _per_port(listeners: Sequence[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    """Queue and limit summed per port (at most MAX_LISTENERS ports): a port has several
    listeners (IPv4 and IPv6, a SO_REUSEPORT group), and one series per label set."""
    out: dict[int, tuple[int, int]] = {}
    for port, queue, backlog in listeners:
        if port not in out and len(out) >= MAX_LISTENERS:
            continue
        q, b = out.get(port, (0, 0))
        out[port] = (q + queue, b + backlog)
    return out


class _Handler(BaseHTTPRequestHandler):
    exporter: MetricsExporter

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.exporter.registry), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = (self.exporter.alive() if path == "/healthz"
                       else self.exporter.readiness())
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # scrapes every few seconds would flood the journal


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsExporter:
    """A renderer that keeps the latest View for the HTTP server's scrapes."""

    def __init__(self, host: str, port: int, *, listeners: Any = None,
                 health: Health | None = None,
                 container_of: Callable[[int], str] | None = None) -> None:
        self.host = host
        self.port = port
        self.lock = threading.Lock()
        self.values: _Values | None = None
        self.listeners: list[tuple[int, int, int]] = []
        self.health = health or Health()
        self._listeners_fn = listeners
        self._container_of = container_of or CgroupContainers()
        self._last_listeners_ns = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        self.server: _Server | None = None

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"exporter": self})
        server_cls = _Server6 if ":" in self.host else _Server
        try:
            self.server = server_cls((self.host, self.port), handler)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {self.host}:{self.port}:"
                             f" {exc.strerror}") from None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="metrics",
                         daemon=True).start()

    def alive(self) -> tuple[bool, str]:
        with self.lock:
            last = self.values.wall_s if self.values is not None else None
        return self.health.alive(last, time.time())

    def readiness(self) -> tuple[bool, str]:
        if self.health.finished:
            return False, "tracer stopped"
        if not self.health.ready:
            return False, "not ready: compiling and attaching the BPF programs"
        return self.alive()

    def _update(self, view: View) -> None:
        listeners = self.listeners
        if self._listeners_fn is not None and view.now_ns - self._last_listeners_ns >= 1e9:
            self._last_listeners_ns = view.now_ns
            try:
                listeners = [(d.lport, d.rqueue, d.wqueue) for d in self._listeners_fn()]
            except Exception:
                listeners = []
        values = _Values.of(view, listeners, self._container_of)
        with self.lock:
            self.values = values
            self.listeners = listeners

    # Renderer protocol
    def notice(self, message: str) -> None:
        pass

    def ready(self, view: View, info: dict[str, Any]) -> None:
        self.health.backend = str(info.get("backend", ""))
        self.health.kernel = str(info.get("kernel", self.health.kernel))
        self._update(view)
        self.health.ready = True

    def changes(self, changes: Sequence[Change], view: View) -> None:
        pass  # the session calls refresh() right after, in the same tick: one update a tick

    def refresh(self, view: View) -> None:
        self._update(view)

    def pid_exit(self, pid: int, view: View) -> None:
        pass

    def finish(self, view: View) -> None:
        self._update(view)
        self.health.finished = True
        self.stop()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class TeeRenderer:
    """Hands every call to several renderers."""

    def __init__(self, *renderers: Any) -> None:
        self.renderers = renderers

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for r in self.renderers:
                getattr(r, name)(*args, **kwargs)
        return call
