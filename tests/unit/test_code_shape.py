"""The shape the code keeps (issue: a house a newcomer can live in): no Python function in the
package or the benchmarks over 60 lines, no C function in bpf/ over 40."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY_MAX = 60
C_MAX = 40
#: A C function's first line: a return type and a name, its parameters, no ';' (a prototype).
_C_FUNC = re.compile(r"^(static\s|int\s|[A-Z_]+\()[^;]*\)?\s*$")


def _python_functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    return [(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}",
             (node.end_lineno or node.lineno) - node.lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _c_functions(path: Path) -> list[tuple[str, int]]:
    """(where, lines) of each top-level brace block that opens right after a function head."""
    out: list[tuple[str, int]] = []
    lines = path.read_text().splitlines()
    depth, start, head = 0, 0, ""
    for i, line in enumerate(lines, 1):
        code = line.split("//")[0]
        if depth == 0 and code.strip() == "{" and _C_FUNC.match(head):
            start = i - 1
        if depth == 0 and code.strip():
            head = code.strip() if code.strip() != "{" else head
        opened = depth
        depth += code.count("{") - code.count("}")
        if opened > 0 and depth == 0 and start:
            out.append((f"{path.relative_to(ROOT)}:{start}", i - start + 1))
            start = 0
    return out


def test_no_python_function_is_over_60_lines() -> None:
    files = sorted((ROOT / "closewait_trace").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    long = [(where, n) for f in files for where, n in _python_functions(f) if n > PY_MAX]
    assert len(files) > 40 and long == []


def test_no_bpf_function_is_over_40_lines() -> None:
    files = sorted((ROOT / "bpf").glob("*.[ch]"))
    found = [(where, n) for f in files for where, n in _c_functions(f)]
    assert len(found) > 30, found  # the scanner sees the functions
    assert [(where, n) for where, n in found if n > C_MAX] == []
