"""`pip install .` must ship the BPF C sources inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_bpf_sources_and_the_package_finds_them(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("closewait_trace-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("closewait_trace/bpf/") for n in names
               if n.startswith("closewait_trace/bpf/")}
    assert {"closewait.bpf.c", "closewait.h", "maps.h", "transitions.h"} <= shipped
    assert shipped == {p.name for p in (ROOT / "bpf").iterdir()}
    assert "closewait_trace/py.typed" in names
    # Installed elsewhere, the package finds its C next to itself, not in a checkout.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = subprocess.run(
        [sys.executable, "-c", "from closewait_trace.kernel.bpfdir import bpf_source_dir;"
         " print(bpf_source_dir())"], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == target / "closewait_trace" / "bpf"
