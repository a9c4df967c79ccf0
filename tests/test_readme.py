"""Every Python example in the README runs, so the README cannot drift from the code.

A block whose first line is ``# some/path.py`` is written to that file (later
blocks import it); every other block runs as a script in a fresh process, in a
directory of its own, with no database URL in the environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
FILE_HEADER = re.compile(r"#\s*([\w/]+\.py)\s*\n")


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_the_readme_has_examples() -> None:
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    """Runs example ``index`` after writing every module the README defines before it."""
    blocks = python_blocks()
    for block in blocks[: index + 1]:
        header = FILE_HEADER.match(block)
        if header:
            target = tmp_path / header.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block)
            (target.parent / "__init__.py").touch()
    if FILE_HEADER.match(blocks[index]):
        return  # a module: it runs as part of the examples that import it
    env = {
        k: v for k, v in os.environ.items() if k not in ("FLOWSMITH_DATABASE_URL", "DATABASE_URL")
    }
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", blocks[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"README example {index} failed:\n{blocks[index]}\n{done.stderr}"
