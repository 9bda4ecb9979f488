"""Agent stage: the tracer as an always-on node agent (`closewait-trace agent`).

The same Session and JSON renderer as the live tracer, writing to stdout (for the journal or
the container log) or to a size-bounded, rotated file, plus the metrics exporter with
/healthz and /readyz. The HTTP server starts before the BPF programs compile, so a supervisor
sees the agent alive (/healthz) but not ready (/readyz) while it compiles. No terminal output.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import UsageError
from .options import Options


class RotatingWriter:
    """A text sink for whole lines that keeps FILE under max_bytes: when the next line would
    pass it, FILE becomes FILE.1 (FILE.1 becomes FILE.2, ... up to `backups`) and a new FILE
    starts. At most (backups + 1) * max_bytes on disk, plus one line."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        if max_bytes < 4096:
            raise UsageError(f"--log-max-bytes {max_bytes} is too small (at least 4096)")
        if backups < 0:
            raise UsageError("--log-backups must not be negative")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.out = self._open()
        self.size = self.out.tell()

    def _open(self) -> IO[str]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a", encoding="utf-8", errors="surrogateescape")
        except OSError as exc:
            raise UsageError(f"cannot write the log {self.path}: {exc.strerror}") from exc

    def write(self, text: str) -> int:
        n = len(text.encode("utf-8", errors="surrogateescape"))
        if self.size and self.size + n > self.max_bytes:
            self._rotate()
        self.out.write(text)
        self.size += n
        return len(text)

    def _rotate(self) -> None:
        self.out.close()
        names = [self.path] + [self.path.with_name(f"{self.path.name}.{i}")
                               for i in range(1, self.backups + 1)]
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        for older, newer in reversed(list(zip(names, names[1:]))):
            if older.exists():
                os.replace(older, newer)
        self.out = self._open()
        self.size = 0

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.close()


#: Where the agent serves metrics, /healthz and /readyz when --metrics is not given.
DEFAULT_LISTEN = "127.0.0.1:9466"


@dataclass(frozen=True)
class AgentConfig:
    """The agent command's options (their defaults are those of its CLI options)."""

    options: Options
    listen: str
    node_name: str | None
    log: str  # "-": standard output
    log_max_bytes: int
    log_backups: int
    timeline_export: Path | None

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()


def run_agent(config: AgentConfig) -> int:
    """Serve health and metrics, attach, trace until SIGTERM/SIGINT; exit 0 when stopped."""
    from .facts import enrich
    from .outputs.metrics import Health, MetricsExporter, TeeRenderer, parse_listen
    from .outputs.render import JsonRenderer
    from .pipeline.timeline import Exporter

    host, port = parse_listen(config.listen)
    sink: Any = (sys.stdout if config.log == "-" else
                 RotatingWriter(Path(config.log), config.log_max_bytes, config.log_backups))
    exporter = MetricsExporter(host, port, listeners=enrich.listeners,
                               health=Health(node=config.node))
    try:
        exporter.start()
        export = Exporter(config.timeline_export) if config.timeline_export else None
        records = JsonRenderer(sink, config.options.timelines, export)
        records.notice(f"agent on node {config.node}: metrics, /healthz and /readyz on"
                       f" http://{_url_host(host)}:{exporter.port}/")
        return _trace(config.options, TeeRenderer(records, exporter), config.node)
    finally:
        exporter.stop()
        if sink is not sys.stdout:
            sink.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _trace(options: Options, renderer: Any, node: str) -> int:
    from .startup import resolve_targets, stop_on_signals, trace

    stop = stop_on_signals()
    trace(resolve_targets(options, renderer.notice), renderer, stop=stop,
          info_extra={"node": node})
    return 0


__all__ = ["AgentConfig", "DEFAULT_LISTEN", "RotatingWriter", "run_agent"]
