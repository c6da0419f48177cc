"""The README's examples run as written."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.timeout(120)


def _example(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python example under '## {heading}'"
    return match.group(1)


async def test_the_embedding_example_runs_a_workflow_in_one_process(tmp_path: Path) -> None:
    script = tmp_path / "edge.py"
    script.write_text(_example("Embedding nerve in your own process"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "{'sensor': 't1', 'value': 21.5}"
    assert (tmp_path / "edge-data" / "jetstream").is_dir()  # the history is on disk there
