"""Prometheus metrics: one more renderer of the session's Views, served over HTTP.

Every scrape builds its series afresh from the latest View, so a socket that left CLOSE_WAIT
leaves no stale series behind. Label cardinality is bounded: no per-socket labels, at most
MAX_SERIES process/port series (the rest add up under pid="other"), listeners capped alike.
The server binds to 127.0.0.1 unless an address is given.
"""

from __future__ import annotations

import errno as errno_mod
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .decode import HIST_BUCKETS, Stat
from .errors import UsageError
from .join import Change, ChangeKind
from .render import View

MAX_SERIES = 100
MAX_LISTENERS = 200


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


@dataclass(frozen=True)
class _Values:
    """Plain values taken from one View at once: a scrape never mixes two moments."""

    groups: tuple[tuple[tuple[str, str, str, str, str], int], ...]
    leaking: int
    flagged: int
    stats: dict[Stat, int]
    lost_exits: int
    hist: tuple[int, ...]
    accept_errors: dict[tuple[int, int], int]
    listeners: tuple[tuple[int, int, int], ...]
    tick_last_s: float = 0.0
    tick_max_s: float = 0.0

    @classmethod
    def of(cls, view: View, listeners: Sequence[tuple[int, int, int]]) -> _Values:
        groups: Counter[tuple[str, str, str, str, str]] = Counter(
            (str(c.owner_pid) if c.owner_pid is not None else "unknown", c.owner_comm or "",
             str(c.service_port), c.direction.value, c.accepted.value)
            for c in view.open)
        return cls(
            groups=tuple(groups.most_common()),
            leaking=sum(1 for c in view.open if c.flagged_ns is not None),
            flagged=view.flagged_total,
            stats=dict(view.stats),
            lost_exits=view.lost_exits,
            hist=tuple(view.hist),
            accept_errors=dict(view.accept_errors),
            listeners=tuple(listeners),
            tick_last_s=view.tick.last_ns / 1e9 if view.tick else 0.0,
            tick_max_s=view.tick.max_ns / 1e9 if view.tick else 0.0,
        )


class _Collector(Collector):
    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        with self.exporter.lock:
            values = self.exporter.values
        if values is None:
            return
        yield from _series(values)


def _series(v: _Values) -> Iterator[Metric]:
    now = GaugeMetricFamily(
        "closewait_sockets", "Sockets now in CLOSE_WAIT, by owner process and service port.",
        labels=["pid", "comm", "port", "direction", "accepted"])
    other = 0
    for i, (labels, n) in enumerate(v.groups):
        if i < MAX_SERIES:
            now.add_metric(list(labels), n)
        else:
            other += n
    if other:
        now.add_metric(["other", "", "", "", ""], other)
    yield now

    leaking = GaugeMetricFamily("closewait_leaking_sockets",
                                "Sockets now in CLOSE_WAIT for longer than the leak threshold.")
    leaking.add_metric([], v.leaking)
    yield leaking

    total = CounterMetricFamily("closewait_leaks_flagged",
                                "Sockets flagged as leaking since the tracer started.")
    total.add_metric([], v.flagged)
    yield total

    entered = CounterMetricFamily("closewait_entered",
                                  "Sockets that entered CLOSE_WAIT on this host (all, unfiltered).")
    entered.add_metric([], v.stats.get(Stat.CW_ENTERED, 0))
    yield entered

    hist = v.hist
    if hist:
        buckets: list[tuple[str, float]] = []
        acc = 0
        for i in range(HIST_BUCKETS):
            acc += hist[i] if i < len(hist) else 0
            # bucket i holds durations with floor(log2(us)) == i, i.e. below 2**(i+1) us
            buckets.append((repr((2 ** (i + 1)) / 1e6), acc))
        buckets.append(("+Inf", acc))
        h = HistogramMetricFamily(
            "closewait_duration_seconds",
            "Time sockets matching the filters spent in CLOSE_WAIT before leaving it.",
            buckets=buckets, sum_value=v.stats.get(Stat.CW_NS_SUM, 0) / 1e9)
        yield h

    errs = CounterMetricFamily("closewait_accept_errors",
                               "Failed accept()/accept4() calls by errno (EAGAIN excluded).",
                               labels=["errno"])
    by_errno: Counter[int] = Counter()
    for (_pid, err), n in v.accept_errors.items():
        by_errno[err] += n
    for err, n in sorted(by_errno.items()):
        errs.add_metric([errno_mod.errorcode.get(err, str(err))], n)
    yield errs

    q = GaugeMetricFamily("closewait_listener_accept_queue",
                          "Connections waiting in a listener's accept queue.", labels=["port"])
    b = GaugeMetricFamily("closewait_listener_backlog", "A listener's accept queue limit.",
                          labels=["port"])
    for port, queue, backlog in v.listeners[:MAX_LISTENERS]:
        q.add_metric([str(port)], queue)
        b.add_metric([str(port)], backlog)
    yield q
    yield b

    lost = CounterMetricFamily("closewait_events_lost",
                               "Events the tracer missed, by reason: non-zero means incomplete.",
                               labels=["reason"])
    for reason, stat in (("ringbuf", Stat.RINGBUF_LOST), ("socks_map_full", Stat.SOCKS_FULL),
                         ("cw_map_full", Stat.CW_FULL), ("listener_map_full", Stat.LISTEN_FULL),
                         ("accept_map_full", Stat.PENDING_FULL)):
        lost.add_metric([reason], v.stats.get(stat, 0))
    lost.add_metric(["exit_events"], v.lost_exits)
    yield lost

    tick = GaugeMetricFamily("closewait_tracer_tick_seconds",
                             "The tracer's own ticks (poll, join, diagnose, render): the last "
                             "and the longest since start.", labels=["which"])
    tick.add_metric(["last"], v.tick_last_s)
    tick.add_metric(["max"], v.tick_max_s)
    yield tick


class MetricsExporter:
    """A renderer that keeps the latest View for the HTTP server's scrapes."""

    def __init__(self, host: str, port: int, *, listeners: Any = None) -> None:
        self.host = host
        self.port = port
        self.lock = threading.Lock()
        self.values: _Values | None = None
        self.listeners: list[tuple[int, int, int]] = []
        self._listeners_fn = listeners
        self._last_listeners_ns = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.server: Any = None

    def start(self) -> None:
        try:
            self.server, _thread = start_http_server(self.port, addr=self.host,
                                                     registry=self.registry)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror}")

    def _update(self, view: View) -> None:
        listeners = self.listeners
        if self._listeners_fn is not None and view.now_ns - self._last_listeners_ns >= 1e9:
            self._last_listeners_ns = view.now_ns
            try:
                listeners = [(d.lport, d.rqueue, d.wqueue) for d in self._listeners_fn()]
            except Exception:
                listeners = []
        values = _Values.of(view, listeners)
        with self.lock:
            self.values = values
            self.listeners = listeners

    # Renderer protocol
    def notice(self, message: str) -> None:
        pass

    def ready(self, view: View, info: dict[str, Any]) -> None:
        self._update(view)

    def changes(self, changes: Sequence[Change], view: View) -> None:
        if any(ch.kind is ChangeKind.FLAGGED for ch in changes):
            self._update(view)

    def refresh(self, view: View) -> None:
        self._update(view)

    def pid_exit(self, pid: int, view: View) -> None:
        pass

    def finish(self, view: View) -> None:
        self._update(view)
        if self.server is not None:
            self.server.shutdown()
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
