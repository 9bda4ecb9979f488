"""Kernel headers: when the first header set does not compile, the tracer compiles with the
next one and says so. A real BCC compile against a really broken tree, on the real kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from closewait_trace.kernel.attach import ProbeSettings, Probes
from closewait_trace.errors import KernelHeadersError
from closewait_trace.kernel.features import choose_backend, ensure_tracefs, probe_features
from closewait_trace.kernel.headers import HeaderCandidate, candidate_header_dirs

pytestmark = [pytest.mark.kernel, pytest.mark.per_kernel]  # the tracepoint backend's compile


def _settings() -> ProbeSettings:
    ensure_tracefs()
    feats = probe_features()
    return ProbeSettings(backend=choose_backend(feats, "tracepoint"),
                         accept_nargs=feats.inet_csk_accept_args)


def _broken(tmp_path: Path) -> HeaderCandidate:
    tree = tmp_path / "broken-headers"
    (tree / "include" / "linux").mkdir(parents=True)
    (tree / "include" / "linux" / "kconfig.h").write_text("#error this header tree is broken\n")
    (tree / "Makefile").write_text("VERSION = 6\n")
    return HeaderCandidate(path=tree, version="0.0-broken", origin="a broken test tree",
                           notice="")


def test_a_header_set_that_fails_to_compile_falls_back_to_the_next(tmp_path: Path) -> None:
    good = candidate_header_dirs()
    assert good, "no installed kernel headers"
    probes = Probes.load(_settings(), [_broken(tmp_path), good[0]])
    try:
        assert probes.header == good[0]
        assert len(probes.notices) == 1
        note = probes.notices[0]
        assert note.startswith(f"kernel headers: compiled with {good[0].origin} after 1 header")
        assert "a broken test tree" in note
    finally:
        probes.close()


def test_no_header_set_compiles_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KernelHeadersError, match="no installed kernel header set compiles"):
        Probes.load(_settings(), [_broken(tmp_path)])
