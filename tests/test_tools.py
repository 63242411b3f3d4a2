"""Every script in tools/ imports (so a renamed or removed specllava name breaks this test, not a
user's run) and answers `--help` quickly, without loading a model or touching data."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = sorted((Path(__file__).resolve().parent.parent / "tools").glob("*.py"))


def test_there_are_tools_to_check():
    assert len(TOOLS) >= 5, TOOLS


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_tool_help_exits_cleanly(tool):
    # a subprocess: the script runs as users run it (`python tools/x.py`), top-level imports included
    done = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tool.parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    assert "Traceback" not in done.stderr
