"""``squashstore-mount-program``: podman's overlay ``mount_program`` for squash stores.

podman (storage.conf ``[storage.options.overlay] mount_program``) calls it as
``PROGRAM -o lowerdir=A:B,upperdir=U,workdir=W[,...] MERGED`` for every container mount and
as ``PROGRAM --version`` once. For each lowerdir that resolves (through the store's ``l/``
links) to ``S/overlay/<LID>/diff`` of a squashstore store (recognised by its format-version
file), the layer's squash file is mounted on that ``diff`` unless a live mount is there (under
the mount registry's lock, so many containers starting at once mount it once; a dead FUSE
mount is replaced), and the container is recorded as a user. Then the overlay itself is
mounted by exec'ing ``fuse-overlayfs`` with the same arguments, or ``mount -t overlay``:
``[mount] overlay`` in the project config is ``auto`` (the default: the kernel overlay for
real root when podman's options are plain overlay options, else fuse-overlayfs),
``fuse-overlayfs`` or ``kernel``. fuse-overlayfs over the kernel's squashfs refuses non-root
container users (its ACL check gets EOPNOTSUPP from squashfs), hence the kernel default.

The fast path (every store layer already mounted, live and recorded) is the same code as
any other start, on string paths: it imports neither pathlib, re, fnmatch, json, threading,
contextlib nor dataclasses (tests/test_fast.py), only the slow path (`_mount`) imports the
mounters. Started by `squashstore.launcher`'s ``python -I -S`` script, the program's whole
run is then ~1/3 of what it was with site and those modules (NOTES.md, branch fast).
"""

from __future__ import annotations

import os
import sys
import time

from squashstore import __version__, config, host, storelayout, trust
from squashstore.errors import SquashstoreError
from squashstore.mountrecords import RecordedUse, RecordRegistry
from squashstore.slots import Slots

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Sequence

    StrPath = str | os.PathLike[str]

PROGRAM = "squashstore-mount-program"
KERNEL_OVERLAY_OPTIONS = ("lowerdir", "upperdir", "workdir", "volatile", "userxattr", "ro",
                          "metacopy", "redirect_dir", "index", "xino", "nfs_export")


class MountProgramError(SquashstoreError):
    """The mount program was called with arguments it cannot handle."""


class OverlayCall(Slots):
    """podman's call: the ``-o`` option string(s) and the merged directory."""

    __slots__ = ("merged", "options")
    options: tuple[str, ...]
    merged: str

    def __init__(self, options: tuple[str, ...], merged: str) -> None:
        self.options = options
        self.merged = merged

    def option(self, key: str) -> str | None:
        for group in self.options:
            for item in group.split(","):
                name, sep, value = item.partition("=")
                if sep and name == key:
                    return value
        return None

    def lowerdirs(self) -> list[str]:
        value = self.option("lowerdir")
        return [d for d in value.split(":") if d] if value else []


def parse_call(argv: Sequence[str]) -> OverlayCall:
    options: list[str] = []
    positional: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-o":
            if i + 1 >= len(args):
                raise MountProgramError("-o needs a value")
            options.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("-o"):
            options.append(arg[2:])
        elif not arg.startswith("-"):
            positional.append(arg)
        i += 1
    if not positional:
        raise MountProgramError("usage: squashstore-mount-program -o lowerdir=...,... MERGED")
    return OverlayCall(tuple(options), positional[-1])


class StoreLayer(Slots):
    """A layer of a squash store (`root` resolved) that a lowerdir leads to (paths as
    strings)."""

    __slots__ = ("layer", "root")
    root: str
    layer: str

    def __init__(self, root: str, layer: str) -> None:
        self.root = root
        self.layer = layer

    @property
    def diff(self) -> str:
        return storelayout.diff_path(self.root, self.layer)

    @property
    def squash(self) -> str:
        return storelayout.squash_path(self.root, self.layer)


def store_layer(lowerdir: str) -> StoreLayer | None:
    """The squash store layer a lowerdir leads to (`storelayout.lowerdir_layer`: only
    ``overlay/l/<short> -> ../<LID>/diff`` is followed). As root, a store other users can
    change is refused (`storelayout.check`, and the link itself: `trust.check_entry`; the
    layer's own paths are checked when it is mounted)."""
    found = storelayout.lowerdir_layer(lowerdir)
    if found is None:
        return None
    root, layer, link = found
    root = os.path.realpath(root)
    storelayout.check(root)
    if link is not None:
        trust.check_entry(os.path.join(root, *trust.LINK_DIR, os.path.basename(link)),
                          symlink_ok=True)
    return StoreLayer(root, layer)


def mount_layers(call: OverlayCall, registry: RecordRegistry) -> list[StoreLayer]:
    """Mount every store layer among the call's lowerdirs and record the container.

    Under the registry's lock, a layer already mounted, live and recorded (and whose squash
    file passes `trust.check_squash_file`, as a mount needs) only gains the container as a
    user (`RecordRegistry.use_if_live`: the fast path, which imports neither
    the store nor the mounters); any other is mounted, adopted or replaced by
    `squashstore.mounts.Registry.ensure_mounted`, imported only then (never
    `squashstore.store`)."""
    found = [layer for d in call.lowerdirs() if (layer := store_layer(d)) is not None]
    user = RecordedUse(os.path.abspath(call.merged), call.option("upperdir") or "",
                       os.getpid(), time.time())
    with registry.locked():
        for item in found:  # every layer checked before any is used or mounted
            if not storelayout.is_file(item.squash):
                raise MountProgramError(f"{item.root}: layer {item.layer[:12]} has no "
                                        "squash file (removed from the store?)")
            # As the slow path refuses to mount it, the fast path refuses to keep using a
            # mount of a squash file others can change now (a live mount reads it).
            trust.check_squash_file(item.squash)
        for item in found:
            if registry.use_if_live(item.diff, user) is None:
                _mount(item, registry, user)
    return found


def _mount(item: StoreLayer, registry: RecordRegistry, user: RecordedUse) -> None:
    """Mount (or adopt, or replace) one layer: the slow path, with the mounters.

    The image id for the record comes from `podmanstore.image_of_layer`, not through
    `squashstore.store`, whose import costs ~60 M instructions (~10 ms) more on every first
    start (callgrind)."""
    from pathlib import Path  # imported when a mount is needed, as are the mounters

    from squashstore import podmanstore
    from squashstore.mounts import Registry

    image = podmanstore.image_of_layer(
        podmanstore.Layout(Path(item.root), "overlay").images_json, item.layer)
    Registry(registry.dir).ensure_mounted(image, item.layer, Path(item.squash),
                                          Path(item.diff), user=user)


CONFIG_CACHE = "config.json"
"""The project configuration's tables as the mount program last read them, in its registry
(`config.load`'s cache)."""


def overlay_argv(call: OverlayCall, argv: Sequence[str], registry: StrPath | None = None
                 ) -> list[str]:
    """The command that mounts the overlay itself."""
    cache = os.path.join(registry, CONFIG_CACHE) if registry is not None else None
    choice = config.load(cache).mount.overlay
    items = [item for group in call.options for item in group.split(",") if item]
    kernel_ok = host.is_real_root() and all(
        item.partition("=")[0] in KERNEL_OVERLAY_OPTIONS for item in items)
    if choice == "kernel" and not kernel_ok:
        raise MountProgramError("the kernel overlay needs root and plain overlay options")
    if choice == "kernel" or (choice == "auto" and kernel_ok):
        return ["mount", "-t", "overlay", "overlay", "-o", ",".join(items), call.merged]
    return ["fuse-overlayfs", *argv]


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-V"):
        print(f"{PROGRAM} version {__version__}")
        return 0
    try:
        call = parse_call(args)
        registry = RecordRegistry()
        # The overlay command first (it reads the configuration: a bad value, or as root
        # a config cache others can change, is refused before anything is mounted or
        # recorded), under the lock: `locked` checks the registry before its cache is read.
        with registry.locked():
            command = overlay_argv(call, args, registry.path)
            mount_layers(call, registry)
    except (SquashstoreError, OSError) as exc:
        sys.stderr.write(f"{PROGRAM}: {_one_line(exc)}\n")
        return 1
    except Exception as exc:  # podman shows our stderr to the user: one line, never a trace
        sys.stderr.write(f"{PROGRAM}: internal error: {type(exc).__name__}: "
                         f"{_one_line(exc)}\n")
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        missing = " not found on PATH" if isinstance(exc, FileNotFoundError) else ""
        sys.stderr.write(f"{PROGRAM}: {command[0]}{missing}: {_one_line(exc)}\n")
        return 1


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
