"""The mount program's launcher and fast path (issue 14, session 5, branch fast).

The launcher (`squashstore.launcher`) starts the mount program as ``python -I -S``: no site,
no editable finder, no ``PYTHON*`` variables, no working directory on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from squashstore import launcher

ROOT = Path(__file__).resolve().parent.parent
VENV_PROGRAM = ROOT / ".venv" / "bin" / launcher.NAME


def test_the_installed_mount_program_is_the_launcher() -> None:
    """scripts/install puts the launcher where the console script was, so storage.conf,
    the tests' podman harness, the demo and the benches all run the fast one."""
    first = VENV_PROGRAM.read_text().splitlines()[0]
    assert first.startswith("#!") and first.endswith(" -IS")
    version = subprocess.run([str(VENV_PROGRAM), "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.startswith(f"{launcher.NAME} version ")


def test_the_launcher_ignores_pythonpath_and_the_working_directory(tmp_path: Path) -> None:
    """Root runs the mount program with podman's environment: a planted ``squashstore``
    package on PYTHONPATH or in the working directory is never imported, and neither are
    site, the user's site directory or PYTHONSTARTUP."""
    target = tmp_path / "bin" / "program"
    target.parent.mkdir()
    assert launcher.main([str(target)]) == 0
    assert os.access(target, os.X_OK)
    planted = tmp_path / "planted"
    (planted / "squashstore").mkdir(parents=True)
    (planted / "squashstore" / "__init__.py").write_text("raise SystemExit('planted')\n")
    (planted / "sitecustomize.py").write_text("raise SystemExit('planted site')\n")
    env = {**os.environ, "PYTHONPATH": str(planted), "PYTHONSTARTUP": str(planted / "x.py"),
           "PYTHONUSERBASE": str(planted)}
    proc = subprocess.run([str(target), "--version"], env=env, cwd=planted,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{launcher.NAME} version ")
    text = target.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n")
    assert str(ROOT) in text


def test_the_launcher_refuses_a_shebang_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="shebang"):
        launcher.script("/path with blank/python", ["/x"])
