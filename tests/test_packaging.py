"""The design card's packaging promise: one import package, fuse/ and cli/ inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_only_the_squashstore_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("squashstore-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"squashstore", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                   + ".dist-info"}
    for module in ("squashstore/fuse/server.py", "squashstore/cli/main.py",
                   "squashstore/squashfs/writer.py", "squashstore/tar/reader.py",
                   "squashstore/py.typed"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "squashstore = squashstore.cli.main:run" in entry_points
    assert "squashstore-mount-program = squashstore.mountprogram:run" in entry_points


def test_mypy_sees_cli_and_fuse_under_their_installed_names() -> None:
    """`[tool.mypy] files = ["squashstore"]` covers cli/ and fuse/ only through these links."""
    for name in ("cli", "fuse"):
        link = ROOT / "squashstore" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
        assert (link / "__init__.py").is_file()


def test_the_command_table_matches_the_modules() -> None:
    """`main.COMMANDS` names each module's commands (a command line imports only its own
    module), and the commands run on every container stop and by cleanup and Slurm import
    neither requests nor the squashfs writer."""
    import argparse
    import importlib

    from squashstore.cli import main

    for module, commands in main.COMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(sub)
        assert tuple(sub.choices) == commands, module
    assert main.modules_for(["--store", "/s", "--debug", "hook", "poststop"]) == (
        "squashstore.cli.hook",)
    assert main.modules_for(["--store=/s", "pull", "x"]) == ("squashstore.cli.registry",)
    assert main.modules_for(["--help"]) == main.modules_for(["nosuch"]) == main.COMMAND_MODULES
    for argv in (["cleanup"], ["hook", "poststop"], ["slurm", "epilog"], ["mounts"]):
        probe = ("import sys; from squashstore.cli.main import build_parser; "
                 f"build_parser({argv!r}).parse_args({argv!r}); "
                 "print(sorted(m for m in ('requests', 'squashstore.squashfs.writer') "
                 "if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == "[]", (argv, out)


def test_data_nested_too_deeply_anywhere_is_one_line(
        monkeypatch: Any, capsys: Any, tmp_path: Path) -> None:
    """The last net under every JSON and tar parser a command calls: a RecursionError is
    one ``squashstore:`` line, exit 1, no traceback."""
    from squashstore import cleanup
    from squashstore.cli import main

    def deep(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(cleanup, "cleanup", deep)
    monkeypatch.setenv("SQUASHSTORE_RUNTIME_DIR", str(tmp_path / "run"))
    assert main.main(["--store", str(tmp_path / "store"), "cleanup"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("squashstore: input nested too deeply") and err.count("\n") == 1
