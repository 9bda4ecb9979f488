"""The enrichment stage, kernel-free: a scripted World with several network namespaces, the
listener choice, the holder to blame, container filters, and the record of the new facts."""

from __future__ import annotations

import io
import json
import socket
from typing import Any

from closewait_trace.facts.containers import ContainerIdentity, Pod, Runtime
from closewait_trace.pipeline.diagnose import Cause, Confidence, Facts, ListenerFacts, diagnose, \
    responsible_holders
from closewait_trace.facts.enrich import DiagSocket, SocketOwner, TcpState
from closewait_trace.pipeline.enrichment import Enrichment, choose_listener, container_matches
from closewait_trace.facts.facts import Listener, ListenerHolder, Namespaces, NetnsSource, Process
from closewait_trace.pipeline.join import Accepted, Connection, Direction, QueuedOn, Tracker
from closewait_trace.outputs.record import FORMAT, FORMAT_VERSION, RecordingWorld, ReplayWorld
from closewait_trace.world import CallOrder

S = 1_000_000_000
HOST, NS_A, NS_B = 4026531840, 4026532001, 4026532002
CID_A, CID_B = "a" * 64, "b" * 64


def _diag(netns: int, inode: int, rport: int, rqueue: int = 0) -> DiagSocket:
    return DiagSocket(family=socket.AF_INET, state=TcpState.CLOSE_WAIT, laddr="127.0.0.1",
                      lport=8080, raddr="127.0.0.1", rport=rport, inode=inode, uid=0,
                      rqueue=rqueue, wqueue=0, cookie=inode or rport, netns=netns)


def _ident(cid: str, name: str) -> ContainerIdentity:
    return ContainerIdentity(cgroup=f"/libpod_parent/libpod-{cid}", runtime=Runtime.PODMAN,
                             container_id=cid, container_name=name)


class TwoContainers:
    """Two namespaces serve 127.0.0.1:8080: A (pid 100, master; pid 101 and 102 workers)
    never accepts; B (pid 200) accepted its socket (inode 777) and keeps it."""

    def __init__(self) -> None:
        self.rows = {NS_A: [_diag(NS_A, 0, 40001, rqueue=1)], NS_B: [_diag(NS_B, 777, 40002)]}
        self.listeners_of = {
            NS_A: [Listener(socket.AF_INET, "127.0.0.1", 8080, 1, 64,
                            (SocketOwner(100, 3, "srv"), SocketOwner(101, 3, "srv"),
                             SocketOwner(102, 3, "srv")), NS_A, 555)],
            NS_B: [Listener(socket.AF_INET, "127.0.0.1", 8080, 0, 64,
                            (SocketOwner(200, 3, "srv"),), NS_B, 666)],
        }
        self.calls: list[str] = []

    def diag_close_wait(self, netns: int | None = None) -> list[DiagSocket]:
        self.calls.append(f"diag {netns}")
        return list(self.rows.get(netns or HOST, []))

    def listeners(self, netns: int | None = None) -> list[Listener]:
        return list(self.listeners_of.get(netns or HOST, []))

    def namespaces(self) -> Namespaces:
        return Namespaces(HOST, (HOST, NS_A, NS_B))

    def lookup(self, netns: int, family: int, laddr: str, lport: int, raddr: str,
               rport: int) -> DiagSocket | None:
        self.calls.append(f"lookup {netns}")
        return next((d for d in self.rows.get(netns, []) if d.rport == rport), None)

    def netns_of(self, pid: int) -> int | None:
        return {100: NS_A, 101: NS_A, 102: NS_A, 200: NS_B}.get(pid)

    def container(self, pid: int) -> ContainerIdentity | None:
        return _ident(CID_A, "alpha") if pid < 200 else _ident(CID_B, "beta")

    def holders(self, listener: Listener) -> list[ListenerHolder]:
        return [ListenerHolder(100, "srv", (3,), "sleeping", "no"),
                ListenerHolder(101, "srv", (3,), "stopped", "accept", accepting=1),
                ListenerHolder(102, "srv", (3,), "sleeping", "no", serving=1,
                               busy_in=("read",))]

    def owners(self, inode: int) -> list[SocketOwner]:
        return [SocketOwner(200, 9, "srv")] if inode == 777 else []

    def refresh_owners(self) -> None:
        pass

    def process(self, pid: int) -> Process:
        return Process(pid, True, 10, 1024, {"read": 1})


def _conn(rport: int, owner: int | None = None) -> Connection:
    return Connection(key=(rport, 1), family=socket.AF_INET, laddr="127.0.0.1", lport=8080,
                      raddr="127.0.0.1", rport=rport, direction=Direction.INBOUND,
                      accepted=Accepted.NO, owner_pid=owner, owner_comm="srv" if owner else None,
                      cw_enter_ns=S, first_seen_ns=S)


def _stage(world: Any) -> Enrichment:
    stage = Enrichment(world, Tracker(threshold_ns=S, report_min_ns=0, start_ns=0))
    stage.begin_tick(2 * S)
    return stage


def test_each_socket_is_found_in_its_own_namespace() -> None:
    world = TwoContainers()
    stage = _stage(world)
    # the kernel keyed listeners by port and gave B's socket A's owner: sock_diag corrects it
    never, kept = _conn(40001), _conn(40002, owner=100)
    stage.enrich([never, kept])
    assert (kept.netns, kept.netns_source, kept.inode, kept.fd) == \
        (NS_B, NetnsSource.SOCK_DIAG, 777, 9)
    assert (kept.owner_pid, kept.accepted, kept.container) == \
        (200, Accepted.YES, _ident(CID_B, "beta"))
    assert (never.netns, never.inode, never.accepted) == (NS_A, 0, Accepted.NO)
    assert never.queued_on is not None and never.queued_on.listener.inode == 555
    assert never.queued_on.why == f"the only listener of namespace {NS_A} on port 8080"
    # the owner's namespace is asked first
    assert world.calls.index(f"lookup {NS_A}") < world.calls.index(f"lookup {NS_B}")


def test_a_queued_socket_accepted_meanwhile_is_found_at_the_flag_in_its_namespace() -> None:
    world = TwoContainers()
    stage = _stage(world)
    queued, lost = _conn(40001), _conn(40002)
    stage.enrich([queued])
    assert (queued.netns, queued.inode, queued.accepted) == (NS_A, 0, Accepted.NO)
    lost.netns, lost.inode = NS_B, None  # never found: the slow tick's retries look for it
    outbound = _conn(40003)
    outbound.direction, outbound.accepted, outbound.netns, outbound.inode = \
        Direction.OUTBOUND, Accepted.UNKNOWN, NS_B, 0
    world.rows[NS_A] = [_diag(NS_A, 888, 40001)]  # accepted, unseen, before the flag
    world.calls.clear()
    stage.at_flag([queued, lost, outbound])
    assert world.calls == [f"lookup {NS_A}"]  # its own namespace, and only the queued one
    assert (queued.inode, queued.accepted, queued.accepted_after_fin, queued.queued_on) == \
        (888, Accepted.YES, True, None)
    verdict = diagnose(queued, stage.facts(queued), 3 * S)
    assert verdict.cause is Cause.NOT_CLOSED
    assert any("found in the accept queue after the peer had closed" in e
               for e in verdict.evidence)


def test_many_flagged_at_once_take_one_dump_of_their_own_namespace() -> None:
    world = TwoContainers()
    stage = _stage(world)
    stage.LOOKUP_BUDGET = 1
    queued = [_conn(40001), _conn(40009)]
    for conn in queued:
        conn.netns, conn.netns_source, conn.inode = NS_A, NetnsSource.SOCK_DIAG, 0
    world.rows[NS_A] = [_diag(NS_A, 888, 40001)]
    stage.at_flag(queued)
    assert world.calls == [f"diag {NS_A}"]
    assert [c.accepted for c in queued] == [Accepted.YES, Accepted.NO]


def test_no_second_look_where_accept_is_always_watched_or_a_recording_predates_it() -> None:
    world = TwoContainers()
    stage = Enrichment(world, Tracker(threshold_ns=S, report_min_ns=0, start_ns=0),
                       relook_at_flag=False)
    stage.begin_tick(2 * S)
    queued = _conn(40001)
    queued.netns, queued.inode = NS_A, 0
    stage.at_flag([queued])
    assert world.calls == [] and queued.accepted is Accepted.NO


def test_the_verdict_blames_the_stopped_worker_not_the_master() -> None:
    world = TwoContainers()
    stage = _stage(world)
    conn = _conn(40001)
    stage.enrich([conn])
    assert conn.owner_pid == 100  # the lowest pid holding the listener, until judged
    conn.flagged_ns = 2 * S
    facts = stage.facts(conn)
    assert conn.owner_pid == 101 and conn.container == _ident(CID_A, "alpha")
    v = diagnose(conn, facts, 3 * S)
    assert (v.cause, v.confidence) == (Cause.NEVER_ACCEPTED, Confidence.CERTAIN)
    assert v.summary == ("never accepted: pid 101 (srv) holds the listener 127.0.0.1:8080 and"
                         " is stopped (SIGSTOP or a debugger): nothing accepts from its queue")
    assert f"listener 127.0.0.1:8080 accept queue 1/64 in netns {NS_A} (inode 555)" \
        in v.evidence
    assert "holder pid 102 (srv): sleeping, waits for it: no, serving 1 connection(s) of this" \
        " port, threads in read" in v.evidence


def test_many_connections_use_one_dump_per_namespace() -> None:
    world = TwoContainers()
    stage = _stage(world)
    stage.LOOKUP_BUDGET = 1
    conns = [_conn(40001), _conn(40002)]
    stage.enrich(conns)
    assert [c.netns for c in conns] == [NS_A, NS_B]
    assert not any(c.startswith("lookup") for c in world.calls)
    assert sorted(c for c in world.calls if c.startswith("diag")) == \
        sorted(f"diag {n}" for n in (HOST, NS_A, NS_B))


def _lst(queue: int, inode: int, laddr: str = "127.0.0.1") -> Listener:
    return Listener(socket.AF_INET, laddr, 8080, queue, 511, (), NS_A, inode)


def test_choose_listener() -> None:
    conn = _conn(1)
    conn.netns = NS_A
    assert choose_listener([], conn) is None
    only = choose_listener([_lst(0, 1, "0.0.0.0")], conn)
    assert only is not None and only.listener.inode == 1 and "only listener" in only.why
    assert choose_listener([_lst(0, 1), _lst(3, 2), _lst(0, 3)], conn) == QueuedOn(
        _lst(3, 2),
        "the one of 3 SO_REUSEPORT listeners on port 8080 whose accept queue is not empty")
    fullest = choose_listener([_lst(1, 1), _lst(3, 2)], conn)
    assert fullest is not None and fullest.listener.inode == 2 and "fullest" in fullest.why
    # an exact address wins over a wildcard listener of the same port
    exact = choose_listener([_lst(5, 1, "0.0.0.0"), _lst(0, 2)], conn)
    assert exact is not None and exact.listener.inode == 2
    # the listener the kernel saw it queued on wins over every candidate, even an empty one;
    # one no longer listed leaves the candidates
    conn.listener_ino = 3
    assert choose_listener(iter([_lst(1, 1), _lst(3, 2), _lst(0, 3)]), conn) == QueuedOn(
        _lst(0, 3), "the listener the kernel queued it on (inode 3)")
    conn.listener_ino = 9
    gone = choose_listener(iter([_lst(1, 1), _lst(3, 2)]), conn)
    assert gone is not None and gone.listener.inode == 2 and "fullest" in gone.why


def _h(pid: int, state: str = "sleeping", waiting: str = "no", serving: int = 0
       ) -> ListenerHolder:
    return ListenerHolder(pid, "w", (3,), state, waiting, serving=serving)


def test_responsible_holders() -> None:
    master = _h(1)
    assert responsible_holders([]) == ("", [])
    assert responsible_holders([master, _h(2, "stopped", "poll"), _h(3, waiting="poll")]) == \
        ("stopped", [_h(2, "stopped", "poll")])
    assert responsible_holders([master, _h(2, waiting="accept"), _h(3, serving=2)]) == \
        ("ready", [])
    assert responsible_holders([master, _h(2, serving=1), _h(3, serving=4)]) == \
        ("busy", [_h(2, serving=1), _h(3, serving=4)])
    assert responsible_holders([master]) == ("never-polls", [master])


def test_busy_workers_verdict_never_names_the_master() -> None:
    conn = _conn(40001, owner=2)
    conn.inode = 0
    lf = ListenerFacts(port=8080, queue=4, backlog=16, laddr="127.0.0.1", netns=NS_A,
                       inode=555, holders=(_h(1), _h(2, serving=1), _h(3, serving=1)))
    v = diagnose(conn, Facts(listener=lf), 3 * S)
    assert v.summary == ("never accepted: every process that accepts from 127.0.0.1:8080 is"
                         " busy serving connections (pid 2 (w), pid 3 (w)); none waits for the"
                         " listener")
    assert v.confidence is Confidence.LIKELY


def test_container_matches() -> None:
    ident = _ident(CID_A, "alpha")
    assert container_matches(ident, "alpha") and container_matches(ident, "aaa")
    assert not container_matches(ident, "aa") and not container_matches(ident, "beta")
    assert not container_matches(None, "alpha")
    assert not container_matches(ContainerIdentity(cgroup="/user.slice"), "user.slice")
    pod = ContainerIdentity(cgroup="/kubepods/x", runtime=Runtime.CRI, container_id=CID_B,
                            pod=Pod(uid="u-1", name="web-1", namespace="shop"))
    assert container_matches(pod, "shop/web-1") and container_matches(pod, "web-1")
    assert container_matches(pod, "u-1") and not container_matches(pod, "shop")


def test_new_facts_are_recorded_and_replayed() -> None:
    live = TwoContainers()
    out = io.StringIO()
    rec = RecordingWorld(live, out, options={}, info={})  # type: ignore[arg-type]
    asked = _ask_everything(rec)
    replay = ReplayWorld(io.StringIO(out.getvalue()), "mem")
    assert replay.version == FORMAT_VERSION and replay.call_order == CallOrder()
    assert _ask_everything(replay) == asked


def _ask_everything(world: Any) -> list[Any]:
    lst = world.listeners(NS_A)
    return [world.namespaces(), world.lookup(NS_B, socket.AF_INET, "127.0.0.1", 8080,
                                             "127.0.0.1", 40002),
            world.lookup(HOST, socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 1),
            world.netns_of(101), world.container(101), world.container(200), lst,
            world.holders(lst[0]), world.diag_close_wait(NS_A)]


def test_a_format_1_recording_is_replayed_namespace_blind() -> None:
    header = json.dumps({"format": FORMAT, "version": 1, "options": {}, "info": {}})
    replay = ReplayWorld(io.StringIO(header + "\n"), "old.cwt")
    assert replay.namespaces() is None
    assert replay.netns_of(5) is None and replay.container(5) is None
    assert replay.holders(_lst(0, 1)) == []
    assert not replay.finished()  # nothing was read
    assert replay.call_order == CallOrder(relook_at_flag=False, sweep_after_arm=False)
    for version, order in ((2, CallOrder(False, False)), (3, CallOrder(True, False)),
                           (4, CallOrder(True, True))):
        head = json.dumps({"format": FORMAT, "version": version, "options": {}, "info": {}})
        assert ReplayWorld(io.StringIO(head + "\n"), "v.cwt").call_order == order


def test_lines_say_how_the_namespace_is_known() -> None:
    from closewait_trace.outputs.render import netns_text

    conn = _conn(1)
    assert netns_text(conn) == "netns=?"
    conn.netns, conn.netns_source = NS_A, NetnsSource.SOCK_DIAG
    assert netns_text(conn) == f"netns={NS_A}(by 4-tuple)"
    conn.netns_source = NetnsSource.OWNER
    assert netns_text(conn) == f"netns={NS_A}(owner's)"
    conn.netns_source = NetnsSource.KERNEL
    assert netns_text(conn) == f"netns={NS_A}"
