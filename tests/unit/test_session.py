"""The session loop on a scripted world (no kernel): the accept watch policy."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from closewait_trace.acceptwatch import DutyCycle
from closewait_trace.facts.enrich import DiagSocket, TcpState
from closewait_trace.kernel.decode import SockFlag, SockInfo
from closewait_trace.pipeline.join import Accepted
from closewait_trace.outputs.render import View
from closewait_trace.options import AcceptWatch, Options
from closewait_trace.session import Session
from closewait_trace.world import Counters, ProcessInfo

S = 1_000_000_000


def _never_accepted(ts: int) -> SockInfo:
    return SockInfo(skaddr=0xAB, ts_first=ts - S, ts_established=ts - S, ts_cw_enter=ts,
                    ts_accept=0, ts_close=0, owner_tgid=42, closer_tgid=0,
                    flags=SockFlag.PASSIVE | SockFlag.OWNER_KNOWN | SockFlag.IN_CW,
                    family=2, laddr="127.0.0.1", lport=80, raddr="127.0.0.1", rport=5000,
                    owner_comm="srv")


class ScriptedWorld:
    """Answers from a script of CLOSE_WAIT maps; records the accept watch switches."""

    def __init__(self) -> None:
        self.now = 100 * S
        self.cw: list[SockInfo] = []
        self.diag: list[Any] = []
        self.watch: list[bool] = []
        self.controls = self

    def now_ns(self) -> int: return self.now
    def checkpoint(self, stop: bool) -> bool: return stop
    def events(self, timeout_ms: int) -> list[Any]: return []
    def close_wait(self) -> list[SockInfo]: return list(self.cw)
    def counters(self) -> Counters: return Counters()
    def diag_close_wait(self, netns: int | None = None) -> list[Any]: return list(self.diag)
    def listeners(self, netns: int | None = None) -> list[Any]: return []
    def namespaces(self) -> None: return None
    def lookup(self, *args: Any) -> None: return None
    def netns_of(self, pid: int) -> None: return None
    def container(self, pid: int) -> None: return None
    def holders(self, listener: Any) -> list[Any]: return []
    def owners(self, inode: int) -> list[Any]: return []
    def refresh_owners(self) -> None: pass
    def process(self, pid: int) -> ProcessInfo: return ProcessInfo(pid, True)
    def descendants(self, pids: Any) -> list[int]: return []
    def set_pids(self, pids: Any) -> None: pass
    def seed_listener(self, netns: int | None, port: int, pid: int, comm: str) -> None: pass
    def set_accept_watch(self, on: bool, waiting: Any = ()) -> None: self.watch.append(on)
    def arm(self) -> None: pass
    def finished(self) -> bool: return False
    def close(self) -> None: pass


class NullRenderer:
    def notice(self, message: str) -> None: pass
    def ready(self, view: View, info: dict[str, Any]) -> None: pass
    def changes(self, changes: Any, view: View) -> None: pass
    def refresh(self, view: View) -> None: pass
    def pid_exit(self, pid: int, view: View) -> None: pass
    def finish(self, view: View) -> None: pass


def _tick(session: Session, world: ScriptedWorld, dt: float) -> None:
    world.now += int(dt * S)
    session.step([])


def test_accept_watch_follows_never_accepted_sockets_and_lingers() -> None:
    world = ScriptedWorld()
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), NullRenderer(), world,
                      {"backend": "tracepoint"})
    session.start()
    _tick(session, world, 1.0)
    assert world.watch[-1] is False  # nothing to explain: off
    world.cw = [_never_accepted(world.now)]
    _tick(session, world, 0.3)  # reported (>= report_min): a never-accepted socket
    assert world.watch[-1] is True
    world.cw = []  # it left CLOSE_WAIT
    _tick(session, world, 1.0)
    assert world.watch[-1] is True  # lingers
    for _ in range(35):
        _tick(session, world, 1.0)
    assert world.watch[-1] is False  # off again 30 s later


def test_accept_watch_always_is_set_once_and_never_steered() -> None:
    world = ScriptedWorld()
    session = Session(Options(accept_watch=AcceptWatch.ALWAYS), NullRenderer(), world,
                      {"backend": "tracepoint"})
    session.start()
    for _ in range(5):
        _tick(session, world, 1.0)
    assert world.watch == [True]


class NoticeRenderer(NullRenderer):
    def __init__(self) -> None:
        self.notices: list[str] = []

    def notice(self, message: str) -> None:
        self.notices.append(message)


def test_a_long_incident_samples_the_accept_watch_and_says_so_once() -> None:
    world = ScriptedWorld()
    renderer = NoticeRenderer()
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), renderer, world,
                      {"backend": "tracepoint", "accept_watch": "auto",
                       "accept_watch_cycle": DutyCycle().as_info()})
    session.start()
    world.cw = [_never_accepted(world.now)]
    for _ in range(70):
        _tick(session, world, 1.0)
    assert world.watch[:30] == [True] * 30
    assert world.watch[30:70].count(True) == 4  # 2 s in each 20 s
    sampled = [n for n in renderer.notices if n.startswith("accept() is now watched")]
    assert len(sampled) == 1, renderer.notices
    # attached 30 s, then 2 of every 20: 34 of the 70 s since start
    assert session.enrichment.accept_coverage == pytest.approx(34 / 70, abs=0.03)
    view = session.view()
    assert view.accept_watch_s is not None and 33 <= view.accept_watch_s <= 35


def test_while_needed_keeps_the_watch_on_and_other_backends_report_no_watch_time() -> None:
    world = ScriptedWorld()
    session = Session(Options(accept_watch=AcceptWatch.WHILE_NEEDED), NullRenderer(), world,
                      {"backend": "tracepoint", "accept_watch": "while-needed"})
    session.start()
    world.cw = [_never_accepted(world.now)]
    for _ in range(70):
        _tick(session, world, 1.0)
    assert world.watch[-40:] == [True] * 40
    assert session.enrichment.accept_coverage == pytest.approx(1.0, abs=0.03)
    kprobe = Session(Options(), NullRenderer(), ScriptedWorld(),
                     {"backend": "kprobe", "accept_watch": "always"})
    assert kprobe.view().accept_watch_s is None


def _diag_row(inode: int) -> DiagSocket:
    return DiagSocket(family=2, state=TcpState.CLOSE_WAIT, laddr="127.0.0.1", lport=80,
                      raddr="127.0.0.1", rport=5000, inode=inode, uid=0, rqueue=1, wqueue=0,
                      cookie=1)


def test_an_accept_between_sampled_windows_is_found_by_its_inode() -> None:
    world = ScriptedWorld()
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), NullRenderer(), world,
                      {"backend": "tracepoint", "accept_watch": "auto",
                       "accept_watch_cycle": DutyCycle().as_info()})
    session.start()
    world.cw = [_never_accepted(world.now)]
    world.diag = [_diag_row(0)]
    for _ in range(40):
        _tick(session, world, 1.0)
    conn = next(iter(session.tracker.open.values()))
    assert conn.accepted is Accepted.NO and conn.inode == 0
    world.diag = [_diag_row(777)]  # accepted while the watch was detached
    for _ in range(6):
        _tick(session, world, 1.0)
    assert conn.accepted is Accepted.YES and conn.inode == 777
    assert conn.accepted_after_fin
    assert session.verdicts[conn.key].cause.value != "never-accepted"


def test_an_accept_no_watch_saw_is_found_when_the_leak_is_flagged() -> None:
    """Found in the queue at CLOSE_WAIT entry, accepted before the tracepoint backend's watch
    attached (so no one saw it): the leak is not reported as never accepted."""
    world = ScriptedWorld()
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), NullRenderer(), world,
                      {"backend": "tracepoint", "accept_watch": "auto"})
    session.start()
    world.cw = [_never_accepted(world.now)]
    world.diag = [_diag_row(0)]
    _tick(session, world, 0.3)
    conn = next(iter(session.tracker.open.values()))
    assert conn.accepted is Accepted.NO and conn.inode == 0 and world.watch[-1] is True
    world.diag = [_diag_row(777)]  # accepted just before the watch attached
    _tick(session, world, 1.0)
    assert conn.flagged_ns is None and conn.accepted is Accepted.NO
    _tick(session, world, 1.0)  # the flag
    assert conn.flagged_ns is not None
    assert conn.accepted is Accepted.YES and conn.inode == 777 and conn.accepted_after_fin
    assert session.verdicts[conn.key].cause.value == "accepted-not-closed"


def test_rechecks_take_turns_when_many_sockets_wait() -> None:
    world = ScriptedWorld()
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), NullRenderer(), world,
                      {"backend": "tracepoint", "accept_watch": "auto",
                       "accept_watch_cycle": DutyCycle().as_info()})
    session.RECHECK_MAX = 2
    looked: list[int] = []
    session.enrichment.accepted_since = lambda conns: looked.extend(c.rport for c in conns) or []
    session.start()
    world.cw = [dataclasses.replace(_never_accepted(world.now), skaddr=0xA0 + i, rport=5000 + i)
                for i in range(3)]
    for _ in range(31):
        _tick(session, world, 1.0)
    for conn in session.tracker.open.values():
        conn.inode = 0  # found in the queue
    for _ in range(16):  # three rechecks, 5 s apart
        _tick(session, world, 1.0)
    assert looked[:6] == [5000, 5001, 5002, 5000, 5001, 5002]
