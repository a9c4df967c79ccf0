"""Every Python example in the README runs and passes mypy --strict, so the README
cannot drift from the code.

A block whose first line is ``# some/path.py`` is written to that file (later
blocks import it); a file named ``test_*.py`` is a test of the README's and runs
under pytest. Every other block runs as a script in a fresh process, in a
directory of its own, with no database URL in the environment; a line
``print(...)  # text`` says what it prints, and the script must print that line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
FILE_HEADER = re.compile(r"#\s*([\w/]+\.py)\s*\n")
# print(...) with a trailing comment: the comment is the line it prints.
PRINTS = re.compile(r"^print\(.*\)\s+#\s(.+)$", re.MULTILINE)
# mypy --strict, but for Django, which ships no types (django-stubs adds them). The
# checkout is on mypy's path: the editable install's import hook is not for mypy.
MYPY_CONFIG = f"""[mypy]
strict = True
mypy_path = {REPO}

[mypy-django.*]
ignore_missing_imports = True
"""


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def write_modules(blocks: list[str], directory: Path) -> list[Path]:
    """Write the blocks that name a file to that file under ``directory``; their paths."""
    written = []
    for block in blocks:
        header = FILE_HEADER.match(block)
        if header:
            target = directory / header.group(1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block)
            (target.parent / "__init__.py").touch()
            written.append(target)
    return written


def run_in(directory: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """``command`` in ``directory``, importing from it, with no database URL set."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("FLOWSMITH_DATABASE_URL", "DATABASE_URL")
    }
    env["PYTHONPATH"] = str(directory)
    return subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_readme_has_examples() -> None:
    """The examples below exist (a changed fence would silently test nothing)."""
    blocks = python_blocks()
    assert len(blocks) >= 8
    assert any(PRINTS.search(block) for block in blocks)
    headers = [h.group(1) for h in map(FILE_HEADER.match, blocks) if h]
    assert any(Path(header).name.startswith("test_") for header in headers)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    """Example ``index`` runs (after writing every module the README defines before it)
    and prints what its comments say."""
    blocks = python_blocks()
    block = blocks[index]
    modules = write_modules(blocks[: index + 1], tmp_path)
    header = FILE_HEADER.match(block)
    if header and not Path(header.group(1)).name.startswith("test_"):
        return  # a module: it runs as part of the examples that import it
    if header:
        done = run_in(tmp_path, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        assert done.returncode == 0, f"README test {modules[-1]} failed:\n{done.stdout}"
        return
    done = run_in(tmp_path, [sys.executable, "-c", block])
    assert done.returncode == 0, f"README example {index} failed:\n{block}\n{done.stderr}"
    printed = done.stdout.splitlines()
    for expected in PRINTS.findall(block):
        assert expected.strip() in printed, f"README example {index} did not print {expected!r}"


def test_the_readme_examples_pass_mypy_strict(tmp_path: Path) -> None:
    """Every example, as a user would paste it into a project checked with mypy --strict."""
    blocks = python_blocks()
    files = write_modules(blocks, tmp_path)
    for index, block in enumerate(blocks):
        if not FILE_HEADER.match(block):
            files.append(tmp_path / f"readme_example_{index}.py")
            files[-1].write_text(block)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    done = run_in(
        tmp_path,
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *[str(f.relative_to(tmp_path)) for f in files],
        ],
    )
    assert done.returncode == 0, done.stdout + done.stderr


SHELL_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)
MAKE_TARGET = re.compile(r"^([a-z-]+):", re.MULTILINE)


def shell_commands() -> list[list[str]]:
    """The README's shell lines, as words, comments left out."""
    lines = "\n".join(SHELL_BLOCK.findall(README.read_text())).splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_the_readme_names_only_make_targets_that_exist() -> None:
    """Every `make TARGET` the README shows is a target of the Makefile."""
    targets = set(MAKE_TARGET.findall((REPO / "Makefile").read_text()))
    shown = [words for words in shell_commands() if words[0] == "make"]
    assert shown
    for words in shown:
        named = [
            w for i, w in enumerate(words[1:], 1) if not w.startswith("-") and words[i - 1] != "-C"
        ]
        assert set(named) <= targets, f"README: {' '.join(words)}"


def test_the_readme_names_only_flowsmith_commands_and_options_that_exist() -> None:
    """Every `flowsmith COMMAND --option` the README shows is in that command's --help."""
    shown = [words for words in shell_commands() if words[0] == "flowsmith"]
    assert shown
    for words in shown:
        command = [w for w in words[1:2] if not w.startswith("-")]
        done = subprocess.run(
            [sys.executable, "-m", "flowsmith_worker", *command, "--help"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"README: {' '.join(words)}\n{done.stderr}"
        for option in (w for w in words if w.startswith("--")):
            assert option in done.stdout, f"README: {' '.join(words)}: no {option}"
