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


def test_batch_steps_summary_splits_the_time_by_rows_and_by_drafting():
    sys.path.insert(0, str(TOOLS[0].parent))
    try:
        from batch_steps import summarize
    finally:
        sys.path.pop(0)
    steps = [{"rows": 4, "seconds": 0.1, "draft_seconds": 0.04, "sizes": [5, 1, 7, 1], "tokens": [3, 1, 4, 1]},
             {"rows": 4, "seconds": 0.02, "draft_seconds": 0.0, "sizes": [1, 1, 1, 1], "tokens": [1, 1, 1, 1]},
             {"rows": 1, "seconds": 0.02, "draft_seconds": 0.0, "sizes": [1], "tokens": [1]}]
    s = summarize(steps, n_rows=4)
    assert s["tokens"] == 14 and s["ms_per_token"] == pytest.approx(140 / 14)
    assert s["drafted"]["steps"] == 1 and s["drafted"]["ms_per_token"] == pytest.approx(100 / 9)
    assert s["drafted"]["draft_ms_per_step"] == pytest.approx(40)
    assert s["plain"]["tokens"] == 5 and s["by_rows"][1]["ms_per_token"] == pytest.approx(20)
    assert list(s["by_rows"]) == [4, 1]
    assert s["tail_share_of_time"] == pytest.approx(0.02 / 0.14)  # 1 row of 4 left
