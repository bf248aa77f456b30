"""The mount program's launcher: ``squashstore-mount-program`` as ``python -I -S``.

podman runs the mount program at every container start, so its interpreter start is part of
every start. A pip console script runs the interpreter with ``site``: with this package
installed editable that alone imports pathlib, importlib.util and urllib.parse for the
editable finder (~35 ms of a ~60 ms ``python -c pass`` here; ``-I -S``: ~20 ms), and it
honours ``PYTHON*`` variables, the user's site directory and (for ``-c``/``-m``) the working
directory: for a program root runs on behalf of podman, none of that is wanted. This module
owns the launcher that avoids it: a script whose shebang is this interpreter with ``-IS``
(isolated: no ``PYTHON*`` variables, no user site, no script or working directory on
``sys.path``; no ``site``) and which sets ``sys.path`` by hand to the directory this package
is imported from and the install's site-packages (the slow path's mounters may import a
dependency), then runs `squashstore.mountprogram.run`. pip cannot install it (its wheel
installer rewrites a ``#!python`` shebang and drops the flags), so ``scripts/install``
writes it over the console script of the same name, and an operator with a wheel install
runs ``python -I -m squashstore.launcher PATH`` (with the install's python) and names PATH in
storage.conf's ``mount_program``; the plain console script keeps working, slower.

The OCI poststop hook (`squashstore.hook`), which podman runs at every container stop, starts
the same way: `PROGRAMS` names each program and the module whose ``run`` it calls, and one
text (`source`) is both the body of a launcher file and, for an install without that file,
the ``-c`` program of `command`'s ``python -I -S -c`` (what ``config --hooks`` prints).
"""

from __future__ import annotations

import os
import sys

import squashstore

NAME = "squashstore-mount-program"
"""The console script's name; the launcher takes its place in ``scripts/install``'s venv."""
HOOK = "squashstore-hook"
"""The OCI hook's console script (`squashstore.hook.PROGRAM`); its launcher likewise."""
PROGRAMS = {NAME: "squashstore.mountprogram", HOOK: "squashstore.hook"}
"""Each program a launcher starts, and the module whose ``run()`` it calls."""
SHEBANG_MAX = 200
"""The longest interpreter path put in a shebang line (Linux reads 255 bytes of the line,
kernels before 5.1 127): a longer one starts through ``/bin/sh``."""


def search_path() -> list[str]:
    """The launcher's ``sys.path`` entries after the standard library: where this package
    is imported from, then the install's site-packages (each once, in that order)."""
    import sysconfig

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(squashstore.__file__)))
    paths = sysconfig.get_paths()
    out: list[str] = []
    for entry in (package_root, paths["purelib"], paths["platlib"]):
        if entry not in out:
            out.append(entry)
    return out


def source(path: list[str], name: str = NAME) -> str:
    """The Python text of program `name`'s launcher after its first line: ``sys.path``
    entries `path`, then the program's ``run()``."""
    return (f"# {name}: started isolated and without site\n"
            "# (written by `python -m squashstore.launcher`; squashstore/launcher.py says why)\n"
            "import sys\n"
            f"sys.path += {path!r}\n"
            f"from {PROGRAMS[name]} import run\n"
            "run()\n")


def script(python: str, path: list[str], name: str = NAME) -> str:
    """The launcher's text for interpreter `python` and ``sys.path`` entries `path`.

    A path a shebang cannot hold (a blank, or longer than `SHEBANG_MAX`) starts the
    interpreter through ``/bin/sh`` instead, as pip's scripts do (one exec more): a
    checkout in a directory with a blank must still install."""
    if not python.startswith("/") or not python.isprintable() or "'" in python or \
            "\\" in python:
        raise ValueError(f"{python!r}: the launcher needs an absolute, printable path "
                         "without quotes or backslashes")
    if any(c in python for c in " \t") or len(python) > SHEBANG_MAX:
        # sh runs line 2 (the exec); Python reads lines 2-3 as one string literal.
        start = f"#!/bin/sh\n'''exec' '{python}' -IS \"$0\" \"$@\"\n' '''\n"
    else:
        start = f"#!{python} -IS\n"
    return start + source(path, name)


def write(target: str, python: str | None = None, name: str = NAME) -> None:
    """Write program `name`'s launcher to `target` (atomically, mode 0755) for this
    install."""
    from pathlib import Path

    from squashstore.atomic import atomic_write

    text = script(python or sys.executable, search_path(), name)
    atomic_write(Path(target), text.encode(), mode=0o755, durable=False)


def default_path(name: str = NAME) -> str:
    """Where ``scripts/install`` writes program `name`'s launcher: over its console script,
    in this install's scripts directory."""
    import sysconfig

    return os.path.join(sysconfig.get_path("scripts"), name)


def is_launcher(target: str, name: str = NAME) -> bool:
    """Whether `target` is program `name`'s launcher for this install (any interpreter
    line; the same ``sys.path`` and program)."""
    try:
        with open(target, encoding="utf-8") as file:
            text = file.read(1 << 16)
    except (OSError, ValueError):
        return False
    return text.startswith("#!") and text.endswith("\n" + source(search_path(), name))


def command(name: str) -> list[str]:
    """The command that starts program `name` of this install fastest: its launcher when
    the install has one (`default_path`, `is_launcher`), else this interpreter with ``-I
    -S -c`` and the launcher's `source` (the same start, without the file)."""
    target = default_path(name)
    if is_launcher(target, name):
        return [target]
    return [sys.executable, "-I", "-S", "-c", source(search_path(), name)]


def main(argv: list[str] | None = None) -> int:
    """``python -m squashstore.launcher [--hook] [PATH]``: write the mount program's launcher
    (with ``--hook``: the OCI hook's) to PATH (default: over the console script, in this
    install's scripts directory) and print PATH."""
    args = sys.argv[1:] if argv is None else argv
    name = NAME
    if args[:1] == ["--hook"]:
        name, args = HOOK, args[1:]
    if len(args) > 1 or (args and args[0].startswith("-")):
        sys.stderr.write("usage: python -m squashstore.launcher [--hook] [PATH]\n")
        return 2
    target = args[0] if args else default_path(name)
    try:
        write(target, name=name)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"squashstore: {target}: {exc}\n")
        return 1
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
