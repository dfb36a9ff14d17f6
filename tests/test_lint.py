"""The pinned ruff finds nothing to fix (pyproject's [tool.ruff] settings), and no test module imports another."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_module_imports_another_or_conftest():
    """Shared helpers live in tests/support/ (a module's helpers imported elsewhere tie the two together)."""
    tests = ROOT / "tests"
    offenders = []
    for path in sorted([*tests.glob("*.py"), *(tests / "support").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n == "conftest" or n.startswith("test_")]
    assert not offenders, offenders
