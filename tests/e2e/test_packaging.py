"""The distribution as users install it: the wheel, its metadata, the Makefile's help."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from flowsmith_worker import __version__

REPO = Path(__file__).resolve().parents[2]


def container_build_sources() -> list[str]:
    """What deploy/Containerfile's build stage copies from the checkout to `pip install .`."""
    sources: list[str] = []
    for line in (REPO / "deploy" / "Containerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--from"):
            sources.extend(words[1:-1])
    return sources


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel, and what its build printed.

    Built from the files the container build copies, and only those: so that build
    (`pip install .` in deploy/Containerfile) has all it needs. Without build
    isolation: the build backend (setuptools, a dev dependency) comes from this venv,
    so the test needs no network.
    """
    source = tmp_path_factory.mktemp("source")
    caches = shutil.ignore_patterns("__pycache__")
    for name in container_build_sources():
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=caches)
        else:
            shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("flowsmith_worker-*.whl")
    return wheel, done.stdout + done.stderr


def test_the_wheel_installs_into_a_fresh_venv_and_its_command_runs(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    """The wheel alone, in a venv of its own, gives a `flowsmith` command that runs and
    migrates a database: the package, its migrations and its entry point are all in it.

    Offline: the wheel goes in with --no-deps, and its dependencies are read from this
    venv's site-packages through a .pth file (a plain path: this venv's own .pth files,
    the editable install of the checkout among them, are not run, so the package
    imported is the wheel's).
    """
    wheel, _ = built
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    subprocess.run([*install, "--no-index", "--quiet", str(wheel)], check=True, timeout=120)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dependencies_of_the_test.pth").write_text(sysconfig.get_paths()["purelib"])

    version = subprocess.run(
        [str(venv / "bin" / "flowsmith"), "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"flowsmith, version {__version__}"
    where = subprocess.run(
        [str(python), "-c", "import flowsmith_worker; print(flowsmith_worker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,  # not the checkout, whose package `python -c` would import first
    ).stdout
    assert where.startswith(site), where
    migrate = subprocess.run(
        [str(venv / "bin" / "flowsmith"), "migrate", "--url", f"sqlite:///{tmp_path / 'a.db'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr


def test_the_wheel_says_what_it_is(built: tuple[Path, str]) -> None:
    """Its name (not the unrelated `flowsmith` on PyPI), an SPDX licence with the licence
    file, the extras, and the typing marker; and the build warns about no licence field."""
    wheel, output = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Name"] == "flowsmith-worker"
    assert metadata["License-Expression"] == "MIT"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"postgres", "mysql", "dev"} <= set(metadata.get_all("Provides-Extra") or [])
    assert "flowsmith_worker/py.typed" in names
    assert "flowsmith_worker/storage/sql/migrations/v4.py" in names
    assert "project.license" not in output  # setuptools' deprecation of the TOML-table form


def test_make_help_shows_each_dollar_once() -> None:
    """`make help` prints the targets' help as written: `$VAR`, not make's escaped `$$VAR`."""
    done = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "$FLOWSMITH_TEST_POSTGRES_URL" in done.stdout
    assert "$$" not in done.stdout
    assert "make dev " in done.stdout and "make dist " in done.stdout
