"""Entry point of `squashstore`: global options, error conventions and command dispatch.

Every command lives in a module of this package that exposes ``register(subparsers)``;
``register`` adds its sub-parsers and sets ``func`` (called with the parsed namespace, returns
an exit code) on each. This module owns the conventions of ``shared/notes/cli.md``: the store
location, one-line errors on stderr starting ``squashstore: `` (exit 1; 2 for usage errors),
``--debug`` for the traceback and ``--version``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from squashstore import __version__, host
from squashstore.errors import SquashstoreError, printable

# Command modules, in the order their commands appear in --help. A module that does not
# exist yet is skipped, so the command line grows as the project does.
COMMANDS = {
    "squashstore.cli.export": ("export",),
    "squashstore.cli.squash": ("squash", "ls", "cat"),
    "squashstore.cli.store": ("init", "migrate", "images", "inspect", "tag", "untag", "rmi",
                              "gc", "verify", "config"),
    "squashstore.cli.mounts": ("mount", "umount", "mounts", "record"),
    "squashstore.cli.serve": ("serve",),
    "squashstore.cli.cleanup": ("cleanup", "slurm"),
    "squashstore.cli.hook": ("hook",),
    "squashstore.cli.registry": ("login", "logout", "push", "pull"),
}
"""Each command module and the commands it registers. A command line imports only its
command's module: importing them all (requests, the squashfs writer, ...) tripled the time of
`cleanup` and of every OCI hook call. `test_the_command_table_matches_the_modules` keeps this
table true."""
COMMAND_MODULES = tuple(COMMANDS)

# Commands that read rootless podman's layers (files owned by subordinate ids) or make,
# check or remove mounts, which live in podman's mount namespace: for an ordinary user they
# run inside rootless podman's namespace (``podman unshare``).
IN_PODMAN_USERNS = frozenset({"migrate", "export", "squash", "mount", "umount", "mounts",
                              "cleanup", "rmi", "gc", "pull", "record"})


class UsageError(SquashstoreError):
    """A command was called with arguments that do not fit (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"squashstore: {message}\n")
        raise SystemExit(2)


def default_store() -> Path:
    """The store: ``$SQUASHSTORE_STORE``, else root's or the user's default location."""
    env = os.environ.get("SQUASHSTORE_STORE")
    if env:
        return Path(env)
    if host.is_real_root():
        return Path("/var/lib/squashstore/store")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return Path(data_home) / "squashstore" / "store"


def command_word(argv: Sequence[str]) -> str | None:
    """The command a command line names (after the global options), None when it names none
    (``--help``, ``--version``, nothing)."""
    words = iter(argv)
    for word in words:
        if word == "--store":
            next(words, None)
        elif word == "--debug" or word.startswith("--store="):
            continue
        else:
            return None if word.startswith("-") else word
    return None


def modules_for(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The command modules a command line needs: its command's, or all of them (for help,
    and for a mistyped command, whose error lists every command)."""
    command = command_word(argv) if argv is not None else None
    for module, commands in COMMANDS.items():
        if command in commands:
            return (module,)
    return COMMAND_MODULES


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of only the one `argv` names."""
    parser = _Parser(
        prog="squashstore",
        description="Squash OCI images into one squashfs file each, in a podman "
        "additional image store, and serve them to containers.",
    )
    parser.add_argument("--store", type=Path, default=None,
                        help="the squash store (default: $SQUASHSTORE_STORE, else "
                        "/var/lib/squashstore/store for root, "
                        "$XDG_DATA_HOME/squashstore/store otherwise)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"squashstore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in modules_for(argv):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def hook_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """The OCI hook's command line as the parser would parse it, without building the
    parser: podman runs it at every container stop, and the parser costs ~14 M
    instructions (argparse's help formatter imports shutil). ``hook poststop``, after
    ``--store S`` or ``--store=S`` as `config --hooks` printed before the hook had its own
    program (`squashstore.hook.run`); None for any other."""
    words = list(argv)
    store = None
    if words[:1] == ["--store"] and len(words) > 1 and not words[1].startswith("-"):
        store, words = Path(words[1]), words[2:]  # (a value like an option: the parser's)
    elif words[:1] and words[0].startswith("--store="):
        store, words = Path(words[0].partition("=")[2]), words[1:]
    if words != ["hook", "poststop"]:
        return None
    from squashstore.cli import hook

    return argparse.Namespace(store=store, debug=False, command="hook", stage="poststop",
                              func=hook.cmd_hook)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = hook_args(words) or build_parser(words).parse_args(words)
    if args.store is None:
        args.store = default_store()
    try:
        if _in_podman_userns(args):
            from squashstore import userns  # not on the OCI hook's path (every stop)

            if userns.should_reexec():
                # The store is resolved here, where $HOME and friends mean what the user
                # meant.
                userns.reexec_in_podman_userns(
                    ["--store", str(args.store.absolute()),
                     *(sys.argv[1:] if argv is None else argv)])
        code = args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("squashstore: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (`squashstore ls ... | head`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except UsageError as exc:
        return _fail(args, exc, 2)
    except (SquashstoreError, OSError) as exc:
        return _fail(args, exc, 1)
    except RecursionError as exc:  # data nested deeper than a parser we call can read
        return _fail(args, SquashstoreError(f"input nested too deeply to read ({exc})"), 1)
    return int(code or 0)


def _in_podman_userns(args: argparse.Namespace) -> bool:
    """Whether the command belongs in rootless podman's namespace (`IN_PODMAN_USERNS`);
    export and squash only when they read podman's own storage."""
    if args.command not in IN_PODMAN_USERNS:
        return False
    if args.command not in ("export", "squash"):
        return True
    from squashstore.sources import reads_local_podman

    return reads_local_podman(str(args.source))


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    if args.debug:
        import traceback

        traceback.print_exc()
    sys.stderr.write(f"squashstore: {one_line(exc)}\n")
    return code


def one_line(exc: BaseException) -> str:
    """An exception as one line: OSErrors with their file name, no newlines, and no other
    control characters (a registry's error text or a name inside an image could otherwise
    drive the user's terminal: escapes are shown as ``\\x1b``)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename:
            text = f"{exc.filename}: {text}"
    else:
        text = str(exc) or type(exc).__name__
    return printable(text)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
