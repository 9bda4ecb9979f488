"""The scenarios of `closewait-trace demo --scenario NAME`: one real-world case each.

Each scenario is a small real server and its clients, in child processes on 127.0.0.1
(ephemeral ports), built from the cases in the seed posts: a process at its open-files limit,
a handler that forgets close(), an edge-triggered epoll accept loop that stops early, a slow
handler, a slow server behind a large backlog, and a client pool whose server closes idle
connections; and the mixed demo (`demo` alone), four small servers at once. The roles
themselves are in roles.py; here is what to run, in which order, and what the tracer should
find.

Order of a run: the servers start and bind (they say their port), the clients start and wait
(gated), the tracer attaches, then the servers listen, and the clients start one after the
other (a client marked `ready` must say READY before the next one starts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .children import Children, DemoError


@dataclass(frozen=True)
class Role:
    """One child process: `python -m closewait_trace.workloads ARGV...`.

    In argv, "{NAME}" is replaced by the port of the server role labelled NAME. A server
    binds and prints "PORT n", then listens when told to and prints "LISTENING"; a client
    starts when told to and, if `ready`, prints "READY" once set up.
    """

    label: str
    argv: tuple[str, ...]
    server: bool = False
    ready: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    seed: str  # which seed post(s) it comes from: for us, never shown to users
    title: str  # one line, for --list-scenarios
    description: str  # shown when the scenario starts
    roles: tuple[Role, ...]
    threshold_s: float  # recommended leak threshold
    duration_s: float  # recommended duration
    expected: tuple[str, ...]  # the cause(s) the tracer should name (diagnose.Cause values)
    #: the parameters the roles were given, for whoever checks the outcome (tests)
    params: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def notice(self) -> str:
        return (f"scenario {self.name}: {self.description}"
                f" Expected cause: {' / '.join(self.expected)}.")


# --- parameters (the tests read them through Scenario.params) -------------------------------


def _params(**values: float) -> Mapping[str, float]:
    return MappingProxyType(values)


FD_LIMIT_NOFILE = 32
FD_LIMIT_BACKLOG = 8
FD_LIMIT_CONNECTS = 20

FORGOTTEN_CONNECTIONS = 5

ET_LIMIT = 1
ET_BURST = 9
ET_PAYLOAD = 45
ET_QUEUE_WAIT = 60.0
ET_CLIENT_WAIT = 2.0

SLOW_DELAY = 2.5
SLOW_PATIENCE = 0.2

BACKLOG_SIZE = 64
BACKLOG_SERVICE = 0.5
BACKLOG_BURST = 10
BACKLOG_PATIENCE = 1.0
BACKLOG_PERIOD = 5.0

POOL_IDLE = 1.0
POOL_SIZE = 5

MIXED_LEAKS = 2  # per leaky server, and the pool's size
MIXED_PERIOD = 0.5


def _burst(*, patience: float, count: int = 1, size: int = 32, period: float = 0.0,
           rounds: int = 0, connect_timeout: float = 2.0, port: str = "{server}"
           ) -> tuple[str, ...]:
    """The `burst` role's arguments (rounds 0: for ever)."""
    return ("burst", port, str(count), str(size), str(patience), str(period), str(rounds),
            str(connect_timeout))


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        name="mixed", seed="all", threshold_s=3.0, duration_s=20.0,
        expected=("never-accepted", "accepted-not-closed", "outbound-not-closed"),
        title="the mixed demo: never-accept, no-close, healthy and pool servers at once",
        description=(
            "four servers at once: one never calls accept(), one accepts and never closes,"
            " a healthy one, and one that closes idle connections of a client pool."
        ),
        roles=(
            Role("never-accept", ("never-accept",), server=True),
            Role("no-close", ("no-close",), server=True),
            Role("healthy", ("healthy",), server=True),
            Role("idle-closer", ("idle-closer", "1.0"), server=True),
            Role("clients", ("clients", "{never-accept},{no-close},{healthy}",
                             "{never-accept},{no-close}", str(MIXED_LEAKS), str(MIXED_PERIOD))),
            Role("pool", ("pool-client", "{idle-closer}", str(MIXED_LEAKS)), ready=True),
        ),
    ),
    Scenario(
        name="fd-limit", seed="seed 000", threshold_s=1.0, duration_s=8.0,
        expected=("accept-failing",),
        params=_params(nofile=FD_LIMIT_NOFILE, backlog=FD_LIMIT_BACKLOG,
                       connects=FD_LIMIT_CONNECTS),
        title="CLOSE_WAIT count equals the accept queue size: the open-files limit is reached",
        description=(
            f"the server runs with RLIMIT_NOFILE {FD_LIMIT_NOFILE} and has filled its fd"
            f" table up to it, then listens with backlog {FD_LIMIT_BACKLOG} and retries"
            f" accept() on EMFILE every 0.1s; a client connects {FD_LIMIT_CONNECTS} times,"
            " sends a few bytes and closes. The accept queue fills"
            f" ({FD_LIMIT_BACKLOG + 1} = backlog+1), the other connects time out, and every"
            " queued connection sits in CLOSE_WAIT without a file descriptor."
        ),
        roles=(
            Role("server", ("fd-limit-server", str(FD_LIMIT_NOFILE), str(FD_LIMIT_BACKLOG)),
                 server=True),
            Role("clients", _burst(count=FD_LIMIT_CONNECTS, size=45, patience=0.5, rounds=1,
                                       connect_timeout=0.2)),
        ),
    ),
    Scenario(
        name="forgotten-close", seed="seeds 004, 000", threshold_s=1.0, duration_s=6.0,
        expected=("accepted-not-closed",), params=_params(connections=FORGOTTEN_CONNECTIONS),
        title="a handler reads to EOF and returns without close()",
        description=(
            "thread-per-connection server whose handler reads until recv() returns EOF and"
            " returns without close(), the socket still referenced; a client makes"
            f" {FORGOTTEN_CONNECTIONS} requests (connect, send, close). Each stays in"
            " CLOSE_WAIT for good, with an fd, its EOF already read."
        ),
        roles=(
            Role("server", ("forgetful-server",), server=True),
            Role("clients", _burst(patience=0.2, period=0.5, rounds=FORGOTTEN_CONNECTIONS)),
        ),
    ),
    Scenario(
        name="et-accept", seed="seed 003", threshold_s=1.0, duration_s=8.0,
        expected=("et-accept-loop",),
        params=_params(limit=ET_LIMIT, burst=ET_BURST, payload=ET_PAYLOAD),
        title="edge-triggered epoll accept loop that returns before EAGAIN",
        description=(
            "non-blocking listener registered EPOLLIN|EPOLLET, limit"
            f" {ET_LIMIT} connection; over the limit the accept loop closes the new"
            " connection and breaks out without draining the queue to EAGAIN. The server"
            " polls first once the held connection and the whole burst are queued (at most"
            f" {ET_QUEUE_WAIT:g}s), so the burst is one edge. A long-lived client holds the"
            " allowed connection; a burst of"
            f" {ET_BURST} clients connects, sends {ET_PAYLOAD} bytes, waits"
            f" {ET_CLIENT_WAIT:g}s and closes: {ET_BURST - ET_LIMIT} connections are never"
            " accepted while the server idles in epoll_wait."
        ),
        roles=(
            Role("server", ("et-server", str(ET_LIMIT), str(ET_BURST), str(ET_QUEUE_WAIT)),
                 server=True),
            Role("holder", ("hold", "{server}"), ready=True),
            Role("burst", _burst(count=ET_BURST, size=ET_PAYLOAD, patience=ET_CLIENT_WAIT,
                                   rounds=1)),
        ),
    ),
    Scenario(
        name="slow-handler", seed="seed 001 (C3)", threshold_s=1.0, duration_s=10.0,
        expected=("closed-late",), params=_params(delay=SLOW_DELAY, patience=SLOW_PATIENCE),
        title="the handler is slower than the client: closed late",
        description=(
            f"thread-per-connection server whose handler sleeps {SLOW_DELAY:g}s before it"
            " reads and closes; every second a client connects, sends a request and gives up"
            f" after {SLOW_PATIENCE:g}s. Each connection is flagged, then closed by the"
            f" application about {SLOW_DELAY - SLOW_PATIENCE:g}s after the client's FIN."
        ),
        roles=(
            Role("server", ("slow-server", str(SLOW_DELAY)), server=True),
            Role("clients", _burst(patience=SLOW_PATIENCE, period=1.0)),
        ),
    ),
    Scenario(
        name="large-backlog", seed="seed 001 (C4)", threshold_s=1.0, duration_s=12.0,
        expected=("drained-late",),
        params=_params(backlog=BACKLOG_SIZE, service=BACKLOG_SERVICE, burst=BACKLOG_BURST,
                       patience=BACKLOG_PATIENCE),
        title="a slow sequential server behind a large backlog: accepted after the peer left",
        description=(
            f"one connection at a time, {BACKLOG_SERVICE:g}s each, behind listen"
            f"({BACKLOG_SIZE}); every {BACKLOG_PERIOD:g}s a burst of {BACKLOG_BURST} clients"
            f" connects, sends a request and gives up after {BACKLOG_PATIENCE:g}s. Most"
            " connections wait in the accept queue after their client closed, and are"
            " accepted and closed late (the ones not yet accepted may be flagged meanwhile)."
        ),
        roles=(
            Role("server", ("sequential-server", str(BACKLOG_SIZE), str(BACKLOG_SERVICE)),
                 server=True),
            Role("clients", _burst(count=BACKLOG_BURST, patience=BACKLOG_PATIENCE,
                                     period=BACKLOG_PERIOD)),
        ),
    ),
    Scenario(
        name="client-pool", seed="seed 002 (C5)", threshold_s=1.0, duration_s=6.0,
        expected=("outbound-not-closed",), params=_params(idle=POOL_IDLE, pool=POOL_SIZE),
        title="a client pool keeps connections the server closed (CLOSE_WAIT on the client)",
        description=(
            "a client keeps a pool of"
            f" {POOL_SIZE} idle connections and never reads them; the server closes connections"
            f" idle for {POOL_IDLE:g}s (a keep-alive timeout). The pool's sockets sit in"
            " CLOSE_WAIT on the client side."
        ),
        roles=(
            Role("server", ("idle-closer", str(POOL_IDLE)), server=True),
            Role("pool", ("pool-client", "{server}", str(POOL_SIZE)), ready=True),
        ),
    ),
)}

DEFAULT = "mixed"


def listing() -> list[str]:
    """One line per scenario, for `demo --list-scenarios`."""
    width = max(len(n) for n in SCENARIOS)
    return [f"{s.name:<{width}}  {s.title} [expect {', '.join(s.expected)}]"
            for s in SCENARIOS.values()]


class ScenarioRun:
    """A scenario's child processes: start_servers() (they bind), then start_clients() once
    the tracer is attached (they listen, the clients go), stop() in any case."""

    def __init__(self, scenario: Scenario) -> None:
        if not scenario.roles:
            raise ValueError(f"scenario {scenario.name} has no roles")
        self.scenario = scenario
        self.children = Children()
        self.ports: dict[str, int] = {}

    def start_servers(self) -> None:
        """Start every role: the servers bind and say their port; the clients start up and
        wait, so that once told they act at once (an edge-triggered server's burst must come
        as one)."""
        try:
            for role in self.scenario.roles:
                if role.server:
                    child = self.children.spawn(role.label, role.argv)
                    self.ports[role.label] = child.expect_port()
            gated = [self.children.spawn(role.label, [a.format(**self.ports) for a in role.argv],
                                         gated=True)
                     for role in self.scenario.roles if not role.server]
            for child in gated:  # started up (seconds under emulation), waiting to be told
                child.expect("WAITING")
        except BaseException:
            self.stop()
            raise

    def start_clients(self) -> None:
        """The tracer is attached: the servers listen, then the clients start in order."""
        servers = [self.children[r.label] for r in self.scenario.roles if r.server]
        for child in servers:
            child.say()
        for child in servers:
            child.expect("LISTENING")
        for role in self.scenario.roles:
            if role.server:
                continue
            self.children[role.label].say()
            if role.ready:
                self.children[role.label].expect("READY")

    def pids(self) -> dict[str, int]:
        return self.children.pids()

    def stop(self) -> None:
        self.children.stop()


class Workload(ScenarioRun):
    """The mixed demo (`closewait-trace demo` without --scenario)."""

    def __init__(self) -> None:
        super().__init__(SCENARIOS[DEFAULT])


def describe(pids: Mapping[str, int], ports: Mapping[str, int]) -> str:
    """The notice naming the demo's processes: "demo: server pid 1 port 2, clients pid 3"."""
    return "demo: " + ", ".join(
        f"{name} pid {pid}" + (f" port {ports[name]}" if name in ports else "")
        for name, pid in pids.items()
    )


__all__ = ["DEFAULT", "Role", "SCENARIOS", "Scenario", "ScenarioRun", "DemoError", "Workload",
           "describe", "listing"]
