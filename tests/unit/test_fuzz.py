"""Fuzzing every parser of outside data with hypothesis, on a fixed budget.

What comes from outside the tracer (a recording handed to `report`, netlink messages, /proc
text, BTF, the command line) may be anything. Each parser must either give an answer or raise
the project's typed error: never another exception, never a traceback, never unbounded work.

Budget: FUZZ_EXAMPLES cases per test (CLOSEWAIT_FUZZ_EXAMPLES, default 300), derandomized so
that CI is repeatable; raise it locally for a longer search.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from closewait_trace.kernel import btf
from closewait_trace import cli
from closewait_trace.facts import enrich
from closewait_trace.errors import CloseWaitError, EnrichError
from closewait_trace.outputs.record import RecordFormatError, open_replay

FUZZ_EXAMPLES = int(os.environ.get("CLOSEWAIT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

SHIPPED = Path(__file__).parent.parent / "data" / "demo-6.18-tracepoint.cwt"
LINES = SHIPPED.read_text().splitlines(keepends=True)

# JSON values to put where a recording had others.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3),
    max_leaves=6)


def _mutate_value(line: str, value: object, rng: random.Random) -> str:
    """The line with one value deep inside replaced (still valid JSON)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return line  # already junk
    node = rec
    for _ in range(4):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) \
            if isinstance(node, list) else []
        if not keys:
            break
        key = rng.choice(keys)
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
            node[key] = value
            break
        node = node[key]
    return json.dumps(rec) + "\n"


@st.composite
def mutated_recordings(draw: st.DrawFn) -> str:
    lines = list(LINES[:120])
    rng = random.Random(draw(st.integers(0, 2**32)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "cut", "junk", "drop", "swap"]))
        if how == "value":
            lines[i] = _mutate_value(lines[i], draw(JSON_VALUES), rng)
        elif how == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif how == "junk":
            lines[i] = draw(st.text(max_size=40)) + "\n"
        elif how == "drop" and len(lines) > 1:
            del lines[i]
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "".join(lines)


@FUZZ
@given(text=mutated_recordings())
def test_report_of_a_damaged_recording_is_a_report_or_one_line(text: str,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "fuzz.cwt"
    path.write_text(text, errors="surrogateescape")
    r = CliRunner().invoke(cli.main, ["report", str(path)])
    assert r.exit_code in (0, 65), (r.exit_code, r.output[-2000:], repr(r.exception))
    assert "Traceback" not in r.output
    if r.exit_code == 65:
        assert r.stderr.strip().splitlines()[-1].startswith("closewait-trace: error: ")


@FUZZ
@given(raw=st.binary(max_size=4096))
def test_open_replay_of_random_bytes(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "raw.cwt"
    path.write_bytes(raw)
    try:
        world = open_replay(path)
    except RecordFormatError:
        return
    world.close()


def _nlmsg(mtype: int, body: bytes, length: int | None = None) -> bytes:
    n = 16 + len(body) if length is None else length
    return struct.pack("=IHHII", n, mtype, 0, 1, 0) + body


NETLINK = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda t, b, n: _nlmsg(t, b, n), st.sampled_from([2, 3, 20, 0]),
              st.binary(max_size=200), st.none() | st.integers(0, 400)),
    st.lists(st.builds(_nlmsg, st.sampled_from([20, 3]), st.binary(min_size=72, max_size=96)),
             max_size=4).map(b"".join),
)


@FUZZ
@given(buf=NETLINK)
def test_sock_diag_messages_parse_or_raise_enrich_error(buf: bytes) -> None:
    out: list[enrich.DiagSocket] = []
    try:
        enrich.parse_diag_messages(buf, frozenset({1, 8, 10}), out, {})
    except EnrichError:
        pass
    for d in out:
        assert 0 <= d.lport < 65536 and 0 <= d.rport < 65536


@FUZZ
@given(text=st.text(max_size=600), raw=st.binary(max_size=300))
def test_proc_text_parsers(text: str, raw: bytes) -> None:
    enrich.parse_limits_nofile(text)
    enrich.parse_status_tgid(text)
    enrich.parse_epoll_fdinfo(text)
    enrich.parse_socket_link(text)
    enrich.parse_syscall_line(text.split())
    for data in (raw, text.encode("utf-8", "surrogateescape")):
        try:
            enrich.parse_stat_target(data)
        except ValueError:
            pass


@FUZZ
@given(fields=st.lists(st.sampled_from(["tfd:", "events:", "5", "ff", "-1", "x", "0x1"]),
                       max_size=8))
def test_epoll_fdinfo_lines(fields: list[str]) -> None:
    for fd, mask in enrich.parse_epoll_fdinfo(" ".join(fields)).items():
        assert isinstance(fd, int) and isinstance(mask, int)


def _vmlinux_head() -> bytes:
    try:
        return btf.VMLINUX_BTF.read_bytes()[:4096]
    except OSError:
        return b"\x9f\xeb\x01\x00" + b"\0" * 60


BTF_HEAD = _vmlinux_head()


@FUZZ
@given(cut=st.integers(0, len(BTF_HEAD)), flips=st.lists(
    st.tuples(st.integers(0, len(BTF_HEAD) - 1), st.integers(0, 255)), max_size=6))
def test_btf_blob_parses_or_is_called_corrupt(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(BTF_HEAD[:cut] if cut else BTF_HEAD)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    try:
        btf.BtfFile(bytes(data), "fuzz")
    except CloseWaitError:
        pass


CLI_OPTION = st.sampled_from(["--threshold", "--report-min", "--duration", "--port", "-p",
                              "--metrics", "--backend", "--timeline", "--max-sockets"])


@FUZZ
@given(args=st.lists(st.tuples(CLI_OPTION, st.text(max_size=30)), max_size=3))
def test_cli_values_are_answered_in_one_line(args: list[tuple[str, str]],
                                             not_root: None) -> None:
    argv = ["--plain"] + [x for pair in args for x in pair]
    r = CliRunner().invoke(cli.main, argv)
    assert r.exit_code in (2, 73, 77), (argv, r.exit_code, r.output, repr(r.exception))
    assert "Traceback" not in r.output
    assert not isinstance(r.exception, (AssertionError, TypeError, ValueError, OverflowError))
