"""Conventions of the code base, enforced (the model: asyncpg's tests/test__sourcecode.py).

ruff and mypy run with the settings in pyproject.toml; the package logs through
`logging.getLogger(__name__)`; the core imports at the top of its modules, except where a
comment right above the import says why it has to wait.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "replicator"
CORE = sorted(p for p in PACKAGE.glob("*.py"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_ruff_is_clean():
    proc = _run("ruff", "check", "--no-cache", "replicator", "tests", "bench", "tools")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_mypy_is_clean():
    proc = _run("mypy", "replicator")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_loggers_are_named_after_their_module(path):
    text = path.read_text()
    names = re.findall(r"logging\.getLogger\(([^)]*)\)", text)
    # getLogger() without a name is the root logger, which handler setup legitimately uses.
    wrong = [n for n in names if n.strip() not in ("__name__", "")]
    assert not wrong, f"{path.name}: getLogger({wrong[0]}) instead of getLogger(__name__)"


def _late_imports(path: Path) -> list[tuple[int, str]]:
    """Imports inside a function with no comment on the line above saying why."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import | ast.ImportFrom):
                # One comment may cover a run of import lines right below it.
                i = node.lineno - 2
                while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
                    i -= 1
                if i < 0 or not lines[i].strip().startswith("#"):
                    found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_at_the_top(path):
    late = _late_imports(path)
    assert not late, (
        f"{path.name}: function-level imports without a comment saying why (a cycle, a "
        f"deliberately lazy import): {late}"
    )
