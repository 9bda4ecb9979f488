"""Real containers for kernel tests: podman with runc, on an overlay of the host's root.

Debian's podman runs containers here with ``runc`` (crun refuses the hybrid cgroup layout),
ulimits within the machine's hard limits, ``--rootfs /:O`` (the host's root as an overlay,
no image) and ``--network none`` (a network namespace of its own with loopback only, so the
tests touch no host network configuration).  :func:`container` always removes what it
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tests.conftest import kernel_skip

RUNC = "/usr/sbin/runc"
PODMAN_BASE = ["podman", "--runtime", RUNC]
RUN_OPTIONS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network",
               "none", "--rootfs", "/:O"]

#: A server that holds accepted CLOSE_WAIT sockets: it listens on 127.0.0.1:PORT (argv[1],
#: 0 for any), a forked client connects N times (argv[2]) and exits (its FINs), the server
#: accepts every connection and keeps it open; then one JSON line with its port, pid,
#: network namespace inode, the accepted sockets' inodes and peer ports, and it sleeps.
CLOSE_WAIT_SERVER = r"""
import json, os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
port = ls.getsockname()[1]
child = os.fork()
if child == 0:
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    for c in conns:
        c.close()
    os._exit(0)
accepted = [ls.accept()[0] for _ in range(n)]
os.waitpid(child, 0)
time.sleep(0.3)
print(json.dumps({"port": port, "pid": os.getpid(),
                  "netns": os.stat("/proc/self/ns/net").st_ino,
                  "inodes": [os.fstat(c.fileno()).st_ino for c in accepted],
                  "peers": [c.getpeername()[1] for c in accepted],
                  "listener": os.fstat(ls.fileno()).st_ino}), flush=True)
time.sleep(3600)
"""


@dataclass(frozen=True)
class Container:
    """A running container: its 64-hex id, name and the host pid of its first process."""

    id: str
    name: str
    pid: int

    def logs(self) -> str:
        return subprocess.run([*PODMAN_BASE, "logs", self.id], capture_output=True, text=True,
                              check=False, timeout=30).stdout

    def first_json_line(self, timeout: float = 30.0) -> dict[str, Any]:
        """The first JSON line the container printed, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs().splitlines():
                if line.startswith("{"):
                    parsed: dict[str, Any] = json.loads(line)
                    return parsed
            time.sleep(0.2)
        raise AssertionError(f"container {self.name} printed no JSON line: {self.logs()!r}")


def require_podman() -> None:
    """Skip (or fail, when kernel tests are required) without podman and runc."""
    if shutil.which("podman") is None or not os.access(RUNC, os.X_OK):
        kernel_skip("podman and runc are not installed (scripts/setup.sh --dev)")


def _inspect_pid(cid: str) -> int:
    out = subprocess.run([*PODMAN_BASE, "inspect", "--format", "{{.State.Pid}}", cid],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(out.strip())


@contextlib.contextmanager
def container(argv: Sequence[str], *, name: str | None = None) -> Iterator[Container]:
    """Run ``argv`` in a new detached container; removed (killed) on exit, also on error."""
    require_podman()
    name = name or f"cwt-{uuid.uuid4().hex[:10]}"
    started = subprocess.run([*PODMAN_BASE, "run", "-d", "--name", name, *RUN_OPTIONS, *argv],
                             capture_output=True, text=True, check=False, timeout=120)
    try:
        if started.returncode != 0:
            raise AssertionError(f"podman run failed: {started.stderr.strip()}")
        cid = started.stdout.strip().splitlines()[-1]
        yield Container(id=cid, name=name, pid=_inspect_pid(cid))
    finally:
        subprocess.run([*PODMAN_BASE, "rm", "-f", "-t", "0", name], capture_output=True,
                       check=False, timeout=120)


def close_wait_server(port: int = 0, n: int = 2, *, name: str | None = None
                      ) -> contextlib.AbstractContextManager[Container]:
    """A container running :data:`CLOSE_WAIT_SERVER`."""
    return container(["python3", "-c", CLOSE_WAIT_SERVER, str(port), str(n)], name=name)
