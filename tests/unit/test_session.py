"""The session loop on a scripted world (no kernel): the accept watch policy."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import pytest

from closewait_trace.acceptwatch import DutyCycle
from closewait_trace.facts.enrich import DiagSocket, SocketOwner, TcpState
from closewait_trace.kernel.decode import SockFlag, SockInfo
from closewait_trace.pipeline.join import Accepted
from closewait_trace.outputs.record import RecordingWorld, ReplayWorld
from closewait_trace.outputs.render import View
from closewait_trace.options import AcceptWatch, Options
from closewait_trace.session import Session, seedable
from closewait_trace.world import CallOrder, Counters, ProcessInfo

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
    def __init__(self, world: ScriptedWorld | None = None) -> None:
        self.notices: list[str] = []
        self.world = world
        #: the accept watch's switches made when each notice was said
        self.watch_then: list[list[bool]] = []

    def notice(self, message: str) -> None:
        self.notices.append(message)
        self.watch_then.append(list(self.world.watch) if self.world else [])


def _incident() -> tuple[ScriptedWorld, NoticeRenderer, Session]:
    """A started session (auto accept watch, its default cycle) with one never-accepted
    socket in CLOSE_WAIT."""
    world = ScriptedWorld()
    renderer = NoticeRenderer(world)
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), renderer, world,
                      {"backend": "tracepoint", "accept_watch": "auto",
                       "accept_watch_cycle": DutyCycle().as_info()})
    session.start()
    world.cw = [_never_accepted(world.now)]
    return world, renderer, session


def test_a_long_incident_samples_the_accept_watch_and_says_so_once() -> None:
    world, renderer, session = _incident()
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


def test_a_listener_joining_a_sampled_incident_has_the_watch_on_again_and_is_named() -> None:
    world, renderer, session = _incident()
    for _ in range(45):
        _tick(session, world, 1.0)
    world.cw.append(dataclasses.replace(_never_accepted(world.now), skaddr=0xCD, lport=8443))
    for _ in range(35):
        _tick(session, world, 1.0)
    assert world.watch[30:45].count(True) < 5  # sampled: port 80's socket is old
    assert world.watch[45:75] == [True] * 30  # port 8443 joined: continuously again
    assert world.watch[75:80].count(True) < 5
    renewed = [i for i, n in enumerate(renderer.notices)
               if n.startswith("accept() is watched continuously")]
    assert len(renewed) == 1 and renderer.notices[renewed[0]].endswith("(port 8443)")
    assert renderer.watch_then[renewed[0]] == world.watch[:46]  # said once attached
    sampled = [n for n in renderer.notices if n.startswith("accept() is now watched")]
    assert len(sampled) == 1, renderer.notices  # at 30 s; not again after the renewal


def test_a_new_incident_is_said_sampled_again() -> None:
    world, renderer, session = _incident()
    for _ in range(40):
        _tick(session, world, 1.0)
    world.cw = []  # the incident ends 30 s later
    for _ in range(35):
        _tick(session, world, 1.0)
    world.cw = [dataclasses.replace(_never_accepted(world.now), skaddr=0xEF, rport=6000)]
    for _ in range(35):
        _tick(session, world, 1.0)
    sampled = [n for n in renderer.notices if n.startswith("accept() is now watched")]
    assert len(sampled) == 2, renderer.notices
    assert not [n for n in renderer.notices if "continuously again" in n], renderer.notices


def test_a_namespace_learned_later_does_not_make_the_same_listener_new() -> None:
    world, renderer, session = _incident()  # the kernel did not give its namespace (0)
    for _ in range(40):
        _tick(session, world, 1.0)
    for conn in session.tracker.open.values():
        conn.netns = 4026532001  # as enrichment fills it in
    for _ in range(10):
        _tick(session, world, 1.0)
    assert world.watch[40:50].count(True) < 5, world.watch  # still sampled
    assert not [n for n in renderer.notices if "continuously again" in n], renderer.notices


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


class ArmOrderWorld(ScriptedWorld):
    """Answers each sweep and each map read from its own script, and says for each whether
    the programs were acting when it was asked."""

    def __init__(self, sweeps: list[list[DiagSocket]], maps: list[list[SockInfo]]) -> None:
        super().__init__()
        self.sweeps, self.maps = sweeps, maps
        self.armed = False
        self.asked: list[tuple[str, bool]] = []

    def arm(self) -> None: self.armed = True

    def diag_close_wait(self, netns: int | None = None) -> list[Any]:
        self.asked.append(("sweep", self.armed))
        return self.sweeps.pop(0) if self.sweeps else list(self.diag)

    def close_wait(self) -> list[SockInfo]:
        self.asked.append(("map", self.armed))
        return self.maps.pop(0) if self.maps else list(self.cw)


def _swept(rport: int) -> DiagSocket:
    return dataclasses.replace(_diag_row(0), rport=rport)


def _entered(rport: int) -> SockInfo:
    return dataclasses.replace(_never_accepted(100 * S), rport=rport, skaddr=rport)


def _start_session(world: ScriptedWorld, order: CallOrder = CallOrder()) -> Session:
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5), NullRenderer(), world,
                      {"backend": "tracepoint", "accept_watch": "auto"}, call_order=order)
    session.start()
    return session


def test_the_sweep_at_start_comes_after_the_programs_act_and_seeds_only_what_was_there() -> None:
    """5001 was there before the programs acted (both sweeps, not in the map); 5000 entered
    CLOSE_WAIT after they acted (in the map); 5002 entered it during the first sweep and
    left it before the map was read (the kernel reports its exit); 5003 entered it after the
    map was read: the programs' too, so none but 5001 is seeded."""
    world = ArmOrderWorld(sweeps=[[_swept(5000), _swept(5001), _swept(5002)],
                                  [_swept(5000), _swept(5001), _swept(5003)]],
                          maps=[[_entered(5000)]])
    session = _start_session(world)
    assert world.asked == [("sweep", True), ("map", True), ("sweep", True)]
    assert [(c.rport, c.preexisting) for c in session.tracker.open.values()] == [(5001, True)]
    world.cw = [_entered(5000), _entered(5003)]
    _tick(session, world, 0.5)
    assert sorted((c.rport, c.preexisting) for c in session.tracker.open.values()) == \
        [(5000, False), (5001, True), (5003, False)]


def test_a_recording_made_before_format_4_is_swept_once_before_the_programs_act() -> None:
    world = ArmOrderWorld(sweeps=[[_swept(5001)]], maps=[])
    session = _start_session(world, CallOrder(sweep_after_arm=False))
    assert world.asked == [("sweep", False)] and world.armed
    assert [c.rport for c in session.tracker.open.values()] == [5001]


def test_a_format_4_start_is_replayed_as_it_ran() -> None:
    sweeps = [[_swept(5000), _swept(5001)], [_swept(5000), _swept(5001)]]
    world = ArmOrderWorld(sweeps=[list(x) for x in sweeps], maps=[[_entered(5000)]])
    out = io.StringIO()
    rec = RecordingWorld(world, out, options={}, info={})  # type: ignore[arg-type]
    live = _start_session(rec)  # type: ignore[arg-type]
    replay = ReplayWorld(io.StringIO(out.getvalue()), "mem")
    again = _start_session(replay, replay.call_order)  # type: ignore[arg-type]
    assert [c.rport for c in again.tracker.open.values()] == \
        [c.rport for c in live.tracker.open.values()] == [5001]
    assert replay.lineno == out.getvalue().count("\n")  # every line read, none left


def test_seedable_matches_by_tuple_and_by_namespace_where_both_know_it() -> None:
    held = [dataclasses.replace(_never_accepted(S), netns=7)]
    rows = [_swept(5000), dataclasses.replace(_swept(5000), netns=7),
            dataclasses.replace(_swept(5000), netns=8), _swept(5001)]
    assert seedable(rows, held, rows) == [rows[2], rows[3]]
    unknown_ns = [dataclasses.replace(held[0], netns=0)]
    assert seedable(rows, unknown_ns, rows) == rows[3:]
    not_in_cw = [dataclasses.replace(held[0], ts_cw_enter=0)]
    assert seedable(rows, not_in_cw, rows) == rows
    assert seedable(rows, [], rows[1:]) == rows[1:]  # gone by the second sweep: not seeded
    v6 = dataclasses.replace(_swept(5000), family=10, laddr="fd00::1", raddr="fd00::2")
    held6 = [dataclasses.replace(held[0], family=10, laddr="fd00:0::1", raddr="fd00::2",
                                 netns=0)]
    assert seedable([v6], held6, [v6]) == []


class FamilyWorld(ArmOrderWorld):
    """pid 42 traced with -p; 43 its child; 44 another process. Each holds one socket."""

    def descendants(self, pids: Any) -> list[int]: return [43] if 42 in pids else []

    def owners(self, inode: int) -> list[Any]: return [SocketOwner(pid=inode, fd=3, comm="w")]


def test_with_p_a_socket_its_child_holds_is_seeded_and_another_process_s_is_not() -> None:
    rows = [dataclasses.replace(_swept(5000 + pid), inode=pid) for pid in (42, 43, 44)]
    world = FamilyWorld(sweeps=[list(rows), list(rows)], maps=[[]])
    session = Session(Options(threshold_ns=2 * S, report_min_ns=S // 5, pids=frozenset({42})),
                      NullRenderer(), world, {"backend": "tracepoint", "accept_watch": "auto"})
    session.start()
    assert sorted(c.owner_pid for c in session.tracker.open.values()) == [42, 43]
