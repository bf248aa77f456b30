"""A squash store's layout and the checks made before any of it is used, importing little.

This module owns the facts about a store's paths that every user of a store needs, and that
the mount program needs at every container start (so it holds them without the rest of
`squashstore.store`): the format-version file that marks a store and the format read
(`is_store`, `check`: as root the store's fixed entries are checked first, `trust.check_top`),
the fixed entries (`TOP_ENTRIES`), a layer id's shape (64 hex digits, so it never leads out
of the store: `checked_id`), a layer's ``diff`` directory and squash file, containers/storage's
overlay layout that a store shares (`overlay_layer`, re-exported by `podmanstore`), and the
one rule
for reaching a store layer from an overlay lowerdir (`lowerdir_layer`): ``overlay/l/<short>``
is followed only when it is a symlink whose target is exactly ``../<LID>/diff``.
"""

from __future__ import annotations

import errno
import os
import stat

from squashstore import trust
from squashstore.errors import SquashstoreError

TYPE_CHECKING = False  # not typing's: the mount program starts without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    StrPath = str | os.PathLike[str]

FORMAT_VERSION = 1
META = "squashstore"
FORMAT_FILE = "format-version"
LOCK_FILE = "lock"
IMAGE_META_DIR = "images"
LAYER_META_DIR = "layers"
SQUASH_DIR = "squash"
TMP_DIR = "tmp"
SQUASH_SUFFIX = ".sqfs"
"""A squash file's name: its layer id and this."""
TOP_ENTRIES = (META, f"{META}/{FORMAT_FILE}", f"{META}/{LOCK_FILE}", f"{META}/{IMAGE_META_DIR}",
               f"{META}/{LAYER_META_DIR}", f"{META}/{SQUASH_DIR}", f"{META}/{TMP_DIR}",
               "overlay", "/".join(trust.LINK_DIR),
               "overlay-layers", "overlay-images", "overlay-layers/layers.json",
               "overlay-images/images.json")
"""The store's fixed entries, checked (as root) whenever it is opened."""
ID_DIGITS = "0123456789abcdef"
ID_LENGTH = 64
"""A layer id: 64 lower-case hex digits (`is_layer_id`)."""
LINK_PREFIX, LINK_SUFFIX = "../", "/diff"
"""The only target an ``overlay/l/<short>`` link may have to be followed: ``../<LID>/diff``
(`link_target_layer`)."""


class StoreError(SquashstoreError):
    """The store is missing, of another format, damaged, or the request does not fit it."""


def format_file(root: StrPath) -> Path:
    from pathlib import Path  # the mount program uses `format_path`

    return Path(format_path(root))


def format_path(root: StrPath) -> str:
    return os.path.join(root, META, FORMAT_FILE)


def is_store(root: StrPath) -> bool:
    """Whether `root` is marked as a squash store (its format-version file exists)."""
    return is_file(format_path(root))


def is_file(path: str) -> bool:
    """``Path(path).is_file()`` without pathlib (the mount program starts without it)."""
    return _is(path, stat.S_ISREG, follow=True)


_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)
"""The errors that mean "no such file" to `_is`, as they do to pathlib's ``is_file``."""


def _is(path: str, kind: Callable[[int], bool], follow: bool) -> bool:
    """pathlib's ``is_file``/``is_symlink`` on a string: False when absent, an `OSError`
    such as EACCES raised (``os.path.isfile`` would call that absent)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return False
        raise
    return kind(st.st_mode)


def check(root: StrPath) -> None:
    """Raise StoreError unless `root` is a store of our format (and, as root, one whose
    fixed entries nobody else can change: `trust.check_top`, before any file of it is
    read)."""
    trust.check_top(root, TOP_ENTRIES)
    try:
        with open(format_path(root)) as file:
            text = file.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"{root}: not a squash store (run `squashstore init`)") from None
    if text != str(FORMAT_VERSION):
        raise StoreError(f"{root}: store format {text!r}, this squashstore reads "
                         f"format {FORMAT_VERSION}")


def is_layer_id(text: str) -> bool:
    """Whether `text` is a layer id: 64 lower-case hex digits, so it never leads out of the
    store (no regular expression: the mount program starts without importing re)."""
    return len(text) == ID_LENGTH and not text.strip(ID_DIGITS)


def checked_id(layer_id: str) -> str:
    """A layer id used in a path: 64 hex digits, so it never leads out of the store."""
    if not is_layer_id(layer_id):
        raise StoreError(f"invalid layer id {layer_id[:80]!r} (damaged records?)")
    return layer_id


def link_target_layer(target: str) -> str | None:
    """The layer id of an ``overlay/l/<short>`` link's target when it is exactly
    ``../<LID>/diff``; None for any other target (never followed)."""
    if not (target.startswith(LINK_PREFIX) and target.endswith(LINK_SUFFIX)):
        return None
    layer = target[len(LINK_PREFIX):len(target) - len(LINK_SUFFIX)]
    return layer if is_layer_id(layer) else None


def diff_dir(root: StrPath, layer_id: str) -> Path:
    from pathlib import Path  # the mount program uses `diff_path`

    return Path(diff_path(root, layer_id))


def diff_path(root: StrPath, layer_id: str) -> str:
    return os.path.join(root, "overlay", checked_id(layer_id), "diff")


def squash_file(root: StrPath, layer_id: str) -> Path:
    from pathlib import Path  # the mount program uses `squash_path`

    return Path(squash_path(root, layer_id))


def squash_path(root: StrPath, layer_id: str) -> str:
    return os.path.join(root, META, SQUASH_DIR, f"{checked_id(layer_id)}{SQUASH_SUFFIX}")


def overlay_layer(path: StrPath, leaf: str) -> tuple[Path, str] | None:
    """``<root>/overlay/<layer>/<leaf>`` -> (root, layer): where containers/storage's overlay
    driver (and a squash store, which has its layout) keeps a layer's ``diff`` or ``merged``."""
    from pathlib import Path  # the mount program uses `layer_of`

    found = layer_of(str(Path(path)), leaf)
    return None if found is None else (Path(found[0]), found[1])


def layer_of(path: str, leaf: str) -> tuple[str, str] | None:
    """`overlay_layer` of a normalised path string (as `Path` or `os.path.abspath` write
    it), as strings."""
    layer_dir, name = os.path.split(path)
    overlay, layer = os.path.split(layer_dir)
    root, overlay_name = os.path.split(overlay)
    if name != leaf or overlay_name != "overlay":
        return None
    return root, layer


def lowerdir_layer(lowerdir: str) -> tuple[str, str, str | None] | None:
    """The squash store layer an overlay lowerdir leads to, as (store root, layer id, the
    ``overlay/l`` link used or None), as absolute path strings: ``S/overlay/l/<short>`` (a
    symlink whose target is exactly ``../<LID>/diff``) or ``S/overlay/<LID>/diff``, S being
    a squash store. Nothing else is followed: a lowerdir that reaches a store by another way
    (a planted symlink) is not a store layer. The store is not checked here (`check`)."""
    path = os.path.abspath(lowerdir)
    links = os.path.dirname(path)
    overlay = os.path.dirname(links)
    if os.path.basename(links) == "l" and os.path.basename(overlay) == "overlay":
        root = os.path.dirname(overlay)
        if not is_store(root) or not _is(path, stat.S_ISLNK, follow=False):
            return None
        layer = link_target_layer(os.readlink(path))
        return None if layer is None else (root, layer, path)
    found = layer_of(path, "diff")
    if found is None or not is_store(found[0]):
        return None
    return found[0], found[1], None
