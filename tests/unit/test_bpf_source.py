"""attach.bpf_source: the BPF program handed to BCC as one text, its local headers inlined.

BCC rewrites map operations only in the text it compiles, not in included files, so the
headers under bpf/ must reach it inlined; these tests pin how (kernel-free)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from closewait_trace.kernel.attach import bpf_source
from closewait_trace.kernel.bpfdir import bpf_source_dir
from closewait_trace.errors import BpfLoadError

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"


def test_every_file_of_bpf_reaches_the_compiled_text() -> None:
    text = bpf_source(BPF_DIR)
    for path in sorted(BPF_DIR.iterdir()):
        assert f'#line 1 "{path.name}"' in text, path.name
    assert not re.search(r'^\s*#\s*include\s+"', text, re.M), "a local include was left"
    assert bpf_source_dir() == BPF_DIR


def test_headers_are_inlined_where_they_stand_with_line_markers(tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text(
        '#include <linux/x.h>\n#include "a.h"\nint main_body;\n#include "absent.h"\n')
    (tmp_path / "a.h").write_text('int a1;\n#include "b.h"\nint a3;\n')
    (tmp_path / "b.h").write_text("int b1;\n")
    assert bpf_source(tmp_path, "main.c").splitlines() == [
        '#line 1 "main.c"', "#include <linux/x.h>",
        '#line 1 "a.h"', "int a1;",
        '#line 1 "b.h"', "int b1;",
        '#line 3 "a.h"', "int a3;",
        '#line 3 "main.c"', "int main_body;",
        '#include "absent.h"',
    ]


def test_a_header_included_under_two_conditionals_is_inlined_under_both(tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text('#if X\n#include "k.h"\n#else\n#include "k.h"\n#endif\n')
    (tmp_path / "k.h").write_text("int k;\n")
    assert bpf_source(tmp_path, "main.c").count("int k;") == 2


def test_headers_that_include_each_other_are_refused(tmp_path: Path) -> None:
    (tmp_path / "main.c").write_text('#include "a.h"\n')
    (tmp_path / "a.h").write_text('#include "main.c"\n')
    with pytest.raises(BpfLoadError, match="main.c -> a.h -> main.c"):
        bpf_source(tmp_path, "main.c")


_FUNC_START = re.compile(r"^(static|int |TRACEPOINT_PROBE|KFUNC_PROBE|KRETFUNC_PROBE)")


def test_no_bpf_function_is_longer_than_40_lines() -> None:
    long = []
    for path in sorted(BPF_DIR.iterdir()):
        start = None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if _FUNC_START.match(line) and not line.rstrip().endswith(";"):
                start = (number, line)
            elif line.startswith("}") and start is not None:
                if number - start[0] + 1 > 40:
                    long.append(f"{path.name}:{start[0]} {start[1]}")
                start = None
    assert not long
