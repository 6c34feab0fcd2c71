"""install.sh, the README's install: what it refuses before it installs anything, and that the README and CI
run the same command. (CI itself installs with it, from a fresh virtual environment.)"""

from __future__ import annotations

import os
import re
import subprocess

from tests.conftest import REPO

INSTALL = REPO / "install.sh"


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return subprocess.run(
        ["bash", str(INSTALL), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_without_an_active_virtual_environment_it_says_how_to_make_one() -> None:
    result = _run([])
    assert result.returncode == 2
    message = "run 'python3 -m venv .venv && . .venv/bin/activate' first"
    assert result.stderr.strip().splitlines() == [f"install.sh: no virtual environment is active; {message}"]


def test_extras_that_are_not_names_are_refused_before_anything_installs(tmp_path) -> None:
    result = _run(["test]; rm -rf x"], VIRTUAL_ENV=str(tmp_path))
    assert result.returncode == 2
    assert "extras 'test]; rm -rf x' must be names" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "uv" not in result.stdout


def test_the_readme_and_ci_install_with_it() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "python3 -m venv .venv && . .venv/bin/activate && ./install.sh && dvc repro" in readme
    assert "python3 -m venv .venv && . .venv/bin/activate && ./install.sh test && pytest" in readme
    assert re.search(r"^\./install\.sh test$", ci, re.MULTILINE)
    assert os.access(INSTALL, os.X_OK)
