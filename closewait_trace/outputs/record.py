"""Record and report: a trace written to a file, read back on any machine without root or BPF.

The file is JSON lines (docs/record-format.md). Line 1 is a header naming the format, its
version, the options and the session's start information. Every following line is one
answer the live World gave the session, in the order the session asked: {"k": KIND, "v": ...}.
Replaying those answers through the same Session code rebuilds every record, leak, verdict
and timeline the live run showed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import socket
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from ..kernel.decode import Event, EventType, ExitHow, SockFlag, SockInfo, Stat
from ..facts.enrich import DiagSocket, SocketOwner, TcpState
from ..errors import CloseWaitError
from ..facts.containers import ContainerIdentity
from ..facts.facts import Listener, ListenerHolder, Namespaces, Process, container_from_dict
from ..world import AcceptCounters, CallOrder, Controls, Counters, World, WorldEnded

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

FORMAT = "closewait-trace-record"
#: 2 adds the network namespaces, container identities and listener holders (and a netns
#: on sock_diag rows and listeners); version 1 files are still read, namespace-blind.
#: 3: a socket flagged while believed never accepted is looked up again at the flag (the
#: lookups are in the file); older files are replayed without those lookups, as recorded.
#: 4: the programs act before the sweep of sockets already in CLOSE_WAIT, which is made
#: twice, the kernel's map read in between (one more sweep and a cw record at the start).
FORMAT_VERSION = 4
#: The longest line `report` reads (a tick with 20,000 sockets in CLOSE_WAIT writes ~5 MB):
#: a longer one is a corrupt file, not a reason to read without end.
MAX_LINE = 64 << 20

T = TypeVar("T")
R = TypeVar("R", bound="DataclassInstance")


class RecordFormatError(CloseWaitError):
    """A recording that cannot be read (corrupt, truncated, or from a newer version)."""

    exit_code = 65


# --- values <-> JSON ------------------------------------------------------------------------


def _enum_field_codec(cls: type[R], name: str, enum: Callable[[int], object]
                      ) -> tuple[Callable[[R], dict[str, Any]], Callable[[dict[str, Any]], R]]:
    """To and from JSON for a record whose field ``name`` is an int enum (written by its
    number); every other field as it is."""
    def to_json(value: R) -> dict[str, Any]:
        d = dataclasses.asdict(value)
        d[name] = int(d[name])
        return d

    def from_json(d: dict[str, Any]) -> R:
        return cls(**{**d, name: enum(int(d[name]))})

    return to_json, from_json


sock_to_json, sock_from_json = _enum_field_codec(SockInfo, "flags", SockFlag)
diag_to_json, diag_from_json = _enum_field_codec(DiagSocket, "state", TcpState)


def event_to_json(e: Event) -> dict[str, Any]:
    return {
        "ts": e.ts, "type": int(e.type), "tgid": e.tgid, "tid": e.tid,
        "oldstate": e.oldstate, "newstate": e.newstate, "exit_how": int(e.exit_how),
        "comm": e.comm, "sock": sock_to_json(e.sock), "exit_code": e.exit_code,
    }


def event_from_json(d: dict[str, Any]) -> Event:
    return Event(
        ts=int(d["ts"]), type=EventType(int(d["type"])), tgid=int(d["tgid"]), tid=int(d["tid"]),
        oldstate=int(d["oldstate"]), newstate=int(d["newstate"]),
        exit_how=ExitHow(int(d["exit_how"])), comm=str(d["comm"]),
        sock=sock_from_json(d["sock"]), exit_code=int(d.get("exit_code", 0)),
    )


def counters_to_json(c: Counters) -> dict[str, Any]:
    return {
        "stats": {s.name: n for s, n in c.stats.items()},
        "accept": {str(pid): dataclasses.asdict(a) for pid, a in c.accept.items()},
        "accept_errs": [[pid, err, n] for (pid, err), n in c.accept_errs.items()],
        "hist": list(c.hist),
    }


def counters_from_json(d: dict[str, Any]) -> Counters:
    return Counters(
        stats={Stat[k]: int(v) for k, v in d["stats"].items() if k in Stat.__members__},
        accept={int(pid): AcceptCounters(**a) for pid, a in d["accept"].items()},
        accept_errs={(int(p), int(e)): int(n) for p, e, n in d["accept_errs"]},
        hist=tuple(int(x) for x in d["hist"]),
    )


def listener_to_json(x: Listener) -> dict[str, Any]:
    return dataclasses.asdict(x)


def listener_from_json(d: dict[str, Any]) -> Listener:
    return Listener(**{**d, "owners": tuple(SocketOwner(**o) for o in d["owners"])})


def holder_to_json(h: ListenerHolder) -> dict[str, Any]:
    return dataclasses.asdict(h)


def holder_from_json(d: dict[str, Any]) -> ListenerHolder:
    return ListenerHolder(**{**d, "fds": tuple(int(f) for f in d["fds"]),
                             "busy_in": tuple(str(b) for b in d.get("busy_in", ()))})


def container_to_json(c: ContainerIdentity | None) -> dict[str, str] | None:
    return None if c is None else c.as_dict()


def container_of_json(d: dict[str, str] | None) -> ContainerIdentity | None:
    return None if d is None else container_from_dict(d)


def namespaces_of_json(d: dict[str, Any] | None) -> Namespaces | None:
    if d is None:
        return None
    return Namespaces(int(d["host"]), tuple(int(n) for n in d["all"]))


def diag_of_json(d: dict[str, Any] | None) -> DiagSocket | None:
    return None if d is None else diag_from_json(d)


# --- the tee --------------------------------------------------------------------------------


class RecordingWorld:
    """A World that answers from `inner` and writes every answer to `out`.

    Durable: what a tick wrote is flushed at the next checkpoint (every tick) and synced to
    disk at most once a second, so a recording cut by SIGKILL or a power cut reads back up to
    its last tick. A write that fails (a full disk, an I/O error) stops the recording, not the
    tracing: `on_error` is told once, and `error` says why for the summary."""

    SYNC_INTERVAL_NS = 1_000_000_000

    def __init__(self, inner: World, out: IO[str], *, options: dict[str, Any],
                 info: dict[str, Any], on_error: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.out = out
        self.on_error = on_error
        self.error: str | None = None
        self.records_dropped = 0
        self._synced_ns = 0
        self._cw: dict[tuple[int, int], SockInfo] = {}
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "kernel": os.uname().release,
            "options": options,
            "info": info,
        }
        self._write(header)

    def _write(self, obj: dict[str, Any]) -> None:
        if self.error is not None:
            self.records_dropped += 1
            return
        try:
            self.out.write(json.dumps(obj, separators=(",", ":")) + "\n")
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.records_dropped += 1
        self.error = f"recording stopped: {exc.strerror or exc}"
        if self.on_error is not None:
            self.on_error(f"{self.error}; tracing goes on without it")

    def _sync(self, force: bool = False) -> None:
        """The tick's records to the file, and to the disk once a second."""
        if self.error is not None:
            return
        try:
            self.out.flush()
            now = time.monotonic_ns()
            if force or now - self._synced_ns >= self.SYNC_INTERVAL_NS:
                self._synced_ns = now
                os.fsync(self.out.fileno())
        except OSError as exc:
            self._failed(exc)
        except io.UnsupportedOperation:
            pass  # not a file (a pipe, a test's buffer): flushed is all there is

    def _put(self, kind: str, value: Any) -> None:
        self._write({"k": kind, "v": value})

    @property
    def controls(self) -> Controls:
        """The inner World's: commands are not answers, so none is written."""
        return self.inner.controls

    def now_ns(self) -> int:
        v = self.inner.now_ns()
        self._put("now", v)
        return v

    def checkpoint(self, stop: bool) -> bool:
        v = self.inner.checkpoint(stop)
        self._put("stop", v)
        self._sync()
        return v

    def events(self, timeout_ms: int) -> list[Event]:
        v = self.inner.events(timeout_ms)
        self._put("events", [event_to_json(e) for e in v])
        return v

    def close_wait(self) -> list[SockInfo]:
        # Written as a change against the previous poll: a socket sitting in CLOSE_WAIT for
        # an hour is written once, not 18,000 times. The session gets the sockets in key
        # order, which the replay reproduces exactly.
        v = sorted(self.inner.close_wait(), key=lambda s: s.key)
        now = {s.key: s for s in v}
        gone = [list(k) for k in self._cw if k not in now]
        new = [sock_to_json(s) for k, s in now.items() if self._cw.get(k) != s]
        self._cw = now
        self._put("cw", {"add": new, "del": gone})
        return v

    def counters(self) -> Counters:
        v = self.inner.counters()
        self._put("counters", counters_to_json(v))
        return v

    def diag_close_wait(self, netns: int | None = None) -> list[DiagSocket]:
        v = self.inner.diag_close_wait(netns)
        self._put("diag", [diag_to_json(d) for d in v])
        return v

    def listeners(self, netns: int | None = None) -> list[Listener]:
        v = self.inner.listeners(netns)
        self._put("listeners", [listener_to_json(x) for x in v])
        return v

    def namespaces(self) -> Namespaces | None:
        v = self.inner.namespaces()
        self._put("netns", None if v is None else {"host": v.host, "all": list(v.all)})
        return v

    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None:
        v = self.inner.lookup(netns, family, laddr, lport, raddr, rport)
        self._put("lookup", None if v is None else diag_to_json(v))
        return v

    def netns_of(self, pid: int) -> int | None:
        v = self.inner.netns_of(pid)
        self._put("pidns", [pid, v])
        return v

    def container(self, pid: int) -> ContainerIdentity | None:
        v = self.inner.container(pid)
        self._put("container", [pid, container_to_json(v)])
        return v

    def holders(self, listener: Listener) -> list[ListenerHolder]:
        v = self.inner.holders(listener)
        self._put("holders", [holder_to_json(h) for h in v])
        return v

    def owners(self, inode: int) -> list[SocketOwner]:
        v = self.inner.owners(inode)
        self._put("owners", {"inode": inode, "owners": [dataclasses.asdict(o) for o in v]})
        return v

    def refresh_owners(self) -> None:
        self.inner.refresh_owners()  # its effect shows in the owners() results recorded after

    def process(self, pid: int) -> Process:
        v = self.inner.process(pid)
        self._put("process", dataclasses.asdict(v))
        return v

    def descendants(self, pids: Collection[int]) -> list[int]:
        v = self.inner.descendants(pids)
        self._put("descendants", list(v))
        return v

    def finished(self) -> bool:
        return self.inner.finished()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._sync(force=True)


# --- the replayer ---------------------------------------------------------------------------


class _NoKernel:
    """A replay's controls: there is no kernel program to tell anything."""

    def set_pids(self, pids: Iterable[int]) -> None:
        pass

    def seed_listener(self, netns: int | None, port: int, pid: int, comm: str) -> None:
        pass

    def set_accept_watch(self, on: bool, waiting: Collection[int] = ()) -> None:
        pass

    def arm(self) -> None:
        pass


def read_line(f: IO[str]) -> str:
    """One line, at most MAX_LINE characters; longer raises ValueError."""
    line = f.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ValueError(f"line longer than {MAX_LINE >> 20} MiB (not a recording?)")
    return line


def read_header(f: IO[str], path: str) -> dict[str, Any]:
    try:
        line = read_line(f)
    except ValueError as exc:
        raise RecordFormatError(f"{path}:1: {exc}") from exc
    except OSError as exc:
        raise RecordFormatError(f"cannot read {path}: {exc.strerror}") from exc
    if not line:
        raise RecordFormatError(f"{path}: empty file, not a closewait-trace recording")
    try:
        header = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordFormatError(f"{path}:1: not a closewait-trace recording ({exc.msg})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RecordFormatError(f"{path}:1: not a closewait-trace recording")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise RecordFormatError(f"{path}:1: bad format version {version!r}")
    if version > FORMAT_VERSION:
        raise RecordFormatError(
            f"{path}: recorded with format version {version}, newer than this closewait-trace"
            f" reads (up to {FORMAT_VERSION}): upgrade closewait-trace to report it"
        )
    for key in ("options", "info"):
        if not isinstance(header.get(key), dict):
            raise RecordFormatError(f"{path}:1: header has no {key!r}")
    return header


class ReplayWorld:
    """A World that answers from a recording. At the end of the file, or at the first line it
    cannot read, it raises WorldEnded, which ends the session after its last whole step;
    `error` then says where and why. A recording that ends cleanly is read to its end by the
    session's own final step, so reading past it means the file was cut short."""

    def __init__(self, f: IO[str], path: str) -> None:
        self.f = f
        self.path = path
        self.header = read_header(f, path)
        self.version = int(self.header["version"])
        self.lineno = 1
        self.error: str | None = None
        self._done = False
        self._cw: dict[tuple[int, int], SockInfo] = {}
        self.controls: Controls = _NoKernel()

    @property
    def call_order(self) -> CallOrder:
        """What the session that made it asked, by format version."""
        return CallOrder(relook_at_flag=self.version >= 3, sweep_after_arm=self.version >= 4)

    def _fail(self, message: str) -> WorldEnded:
        if self.error is None:
            self.error = f"{self.path}:{self.lineno}: {message}"
        self._done = True
        return WorldEnded(self.error)

    def _next(self, kind: str) -> Any:
        if self._done:
            raise WorldEnded(self.error or "end of recording")
        self.lineno += 1
        try:
            line = read_line(self.f)
        except (ValueError, OSError) as exc:
            raise self._fail(str(exc)) from exc
        if not line:
            raise self._fail("the recording ends early (truncated?)")
        try:
            if not line.endswith("\n"):
                raise ValueError("truncated line (the recording was cut short)")
            rec = json.loads(line)
            if not isinstance(rec, dict) or "k" not in rec or "v" not in rec:
                raise ValueError("not a record")
            if rec["k"] != kind:
                raise ValueError(f"expected a {kind!r} record, found {rec['k']!r}")
            return rec["v"]
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise self._fail(f"unreadable record: {exc}") from exc

    def _value(self, kind: str, convert: Callable[[Any], T]) -> T:
        raw = self._next(kind)
        try:
            return convert(raw)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError,
                OverflowError) as exc:
            raise self._fail(f"unreadable {kind!r} record: {exc!r}") from exc

    def now_ns(self) -> int:
        return self._value("now", int)

    def checkpoint(self, stop: bool) -> bool:
        return self._value("stop", bool)

    def events(self, timeout_ms: int) -> list[Event]:
        return self._value("events", lambda r: [event_from_json(e) for e in r])

    def close_wait(self) -> list[SockInfo]:
        def apply(r: dict[str, Any]) -> list[SockInfo]:
            for key in r["del"]:
                self._cw.pop((int(key[0]), int(key[1])), None)
            for d in r["add"]:
                sock = sock_from_json(d)
                self._cw[sock.key] = sock
            return sorted(self._cw.values(), key=lambda s: s.key)

        return self._value("cw", apply)

    def counters(self) -> Counters:
        return self._value("counters", counters_from_json)

    def diag_close_wait(self, netns: int | None = None) -> list[DiagSocket]:
        return self._value("diag", lambda r: [diag_from_json(d) for d in r])

    def listeners(self, netns: int | None = None) -> list[Listener]:
        return self._value("listeners", lambda r: [listener_from_json(x) for x in r])

    # Format 1 did not record these: its replays answer "unknown" without reading a line,
    # which is what the session that wrote it knew.

    def namespaces(self) -> Namespaces | None:
        if self.version < 2:
            return None
        return self._value("netns", namespaces_of_json)

    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None:
        return self._value("lookup", diag_of_json)

    def netns_of(self, pid: int) -> int | None:
        if self.version < 2:
            return None
        return self._value("pidns", lambda r: self._for_pid(r, pid, lambda v: (
            None if v is None else int(v))))

    def container(self, pid: int) -> ContainerIdentity | None:
        if self.version < 2:
            return None
        return self._value("container", lambda r: self._for_pid(r, pid, container_of_json))

    def holders(self, listener: Listener) -> list[ListenerHolder]:
        if self.version < 2:
            return []
        return self._value("holders", lambda r: [holder_from_json(h) for h in r])

    @staticmethod
    def _for_pid(r: list[Any], pid: int, convert: Callable[[Any], T]) -> T:
        if int(r[0]) != pid:
            raise ValueError(f"an answer about pid {r[0]}, asked about {pid}")
        return convert(r[1])

    def owners(self, inode: int) -> list[SocketOwner]:
        def conv(r: dict[str, Any]) -> list[SocketOwner]:
            if int(r["inode"]) != inode:
                raise ValueError(f"owners of inode {r['inode']}, asked for {inode}")
            return [SocketOwner(**o) for o in r["owners"]]

        return self._value("owners", conv)

    def refresh_owners(self) -> None:
        pass

    def process(self, pid: int) -> Process:
        def conv(r: dict[str, Any]) -> Process:
            info = Process(**{**r, "et_fds": tuple(r.get("et_fds", ())),
                                  "threads": dict(r.get("threads", {}))})
            if info.pid != pid:
                raise ValueError(f"process {info.pid}, asked for {pid}")
            return info

        return self._value("process", conv)

    def descendants(self, pids: Collection[int]) -> list[int]:
        return self._value("descendants", lambda r: [int(p) for p in r])

    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        self.f.close()


def open_replay(path: Path) -> ReplayWorld:
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RecordFormatError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return ReplayWorld(f, str(path))
    except BaseException:
        f.close()
        raise
