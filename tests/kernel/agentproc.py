"""`closewait-trace agent` in a subprocess for kernel tests: its HTTP endpoints, its log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import BACKEND, START_TIMEOUT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Agent:
    log: Path
    args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    #: runs the agent, e.g. ["setpriv", "--bounding-set=-all,+bpf", "--"]
    prefix: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str] | None = None, ready: bool = True) -> Agent:
        cmd = [*self.prefix, sys.executable, "-m", "closewait_trace", "agent", "--backend", BACKEND,
               "--metrics", f"127.0.0.1:{self.port}", "--log", str(self.log), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        if not ready:
            return self
        try:
            self.wait_http("/readyz", 200, START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_http(self, path: str, code: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        got = (0, "")
        while time.monotonic() < deadline:
            got = http_get(self.url + path)
            if got[0] == code:
                return got[1]
            assert self.proc is not None
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{path} answered {got} (wanted {code}); agent: {self.output()}")

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def wait_record(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.records():
                if pred(rec):
                    return rec
            time.sleep(0.2)
        raise AssertionError(f"no such record in {timeout}s: {self.records()[-5:]}")

    def output(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return "(running)"
        out, err = self.proc.communicate()
        return f"rc={self.proc.returncode} stdout={out[-2000:]!r} stderr={err[-2000:]!r}"

    def stop(self) -> tuple[int, bytes, bytes]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, err


def bounded(caps: Sequence[str]) -> list[str]:
    """A command prefix: root's uid with only these capabilities (CAP_BPF, ...)."""
    names = ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    return ["setpriv", f"--bounding-set=-all{',' if names else ''}{names}", "--inh-caps=-all",
            "--"]
