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
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from squashstore import __version__, config, host, podmanstore, trust
from squashstore.image import SquashstoreError
from squashstore.mounts import RecordedUse, Registry
from squashstore.store import Store

PROGRAM = "squashstore-mount-program"
KERNEL_OVERLAY_OPTIONS = ("lowerdir", "upperdir", "workdir", "volatile", "userxattr", "ro",
                          "metacopy", "redirect_dir", "index", "xino", "nfs_export")


class MountProgramError(SquashstoreError):
    """The mount program was called with arguments it cannot handle."""


@dataclass(frozen=True)
class OverlayCall:
    """podman's call: the ``-o`` option string(s) and the merged directory."""

    options: tuple[str, ...]
    merged: str

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


@dataclass(frozen=True)
class StoreLayer:
    store: Store
    layer: str

    @property
    def diff(self) -> Path:
        return self.store.diff_dir(self.layer)


_LINK_TARGET = re.compile(r"\.\./([0-9a-f]{64})/diff")


def store_layer(lowerdir: str) -> StoreLayer | None:
    """The squash store layer a lowerdir leads to: ``S/overlay/l/<short>`` (a symlink whose
    target is exactly ``../<LID>/diff``) or ``S/overlay/<LID>/diff``, S being a squash
    store. Nothing else is followed: a lowerdir that reaches a store by another way (a
    planted symlink) is not a store layer. As root, a store other users can change is
    refused (`trust`; the layer's own paths are checked when it is mounted)."""
    path = Path(os.path.abspath(lowerdir))
    if path.parent.name == "l" and path.parent.parent.name == "overlay":
        root, link = path.parent.parent.parent, path
        if not Store.is_store(root) or not link.is_symlink():
            return None
        match = _LINK_TARGET.fullmatch(os.readlink(link))
        if match is None:
            return None
        layer = match.group(1)
    else:
        found = podmanstore.overlay_layer(path, "diff")
        if found is None or not Store.is_store(found[0]):
            return None
        (root, layer), link = found, None
    store = Store(root)
    store.check()
    if link is not None:
        trust.check_entry(store.links / link.name, symlink_ok=True)
    return StoreLayer(store, layer)


def mount_layers(call: OverlayCall, registry: Registry) -> list[StoreLayer]:
    """Mount every store layer among the call's lowerdirs and record the container."""
    found = [layer for d in call.lowerdirs() if (layer := store_layer(d)) is not None]
    user = RecordedUse(os.path.abspath(call.merged), call.option("upperdir") or "",
                       os.getpid(), time.time())
    for item in found:
        squash = item.store.squash_file(item.layer)
        if not squash.is_file():
            raise MountProgramError(f"{item.store.root}: layer {item.layer[:12]} has no "
                                    "squash file (removed from the store?)")
        image = item.store.image_of_layer(item.layer)
        registry.ensure_mounted(image, item.layer, squash, item.diff, user=user)
    return found


def overlay_argv(call: OverlayCall, argv: Sequence[str]) -> list[str]:
    """The command that mounts the overlay itself."""
    choice = config.load().mount.overlay
    items = [item for group in call.options for item in group.split(",") if item]
    kernel_ok = host.is_real_root() and all(
        item.partition("=")[0] in KERNEL_OVERLAY_OPTIONS for item in items)
    if choice == "kernel" and not kernel_ok:
        raise MountProgramError("the kernel overlay needs root and plain overlay options")
    if choice == "kernel" or (choice == "auto" and kernel_ok):
        return ["mount", "-t", "overlay", "overlay", "-o", ",".join(items), call.merged]
    binary = shutil.which("fuse-overlayfs")
    if binary is None:
        raise MountProgramError("fuse-overlayfs not found on PATH")
    return [binary, *argv]


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
        mount_layers(call, Registry())
        command = overlay_argv(call, args)
    except (SquashstoreError, OSError) as exc:
        sys.stderr.write(f"{PROGRAM}: {_one_line(exc)}\n")
        return 1
    except Exception as exc:  # podman shows our stderr to the user: one line, never a trace
        sys.stderr.write(f"{PROGRAM}: internal error: {type(exc).__name__}: "
                         f"{_one_line(exc)}\n")
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0] if os.path.isabs(command[0]) else shutil.which(command[0]) or command[0],
             command)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
