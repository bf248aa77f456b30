"""The layer merge: an image's layer tars flattened into one tree, streaming, top layer first.

`LayerMerge` reads each layer's tar once, from the top layer down. An entry of a lower layer
survives unless a higher layer shadows it: the same path exists higher up (a directory over a
directory only hides the lower one's metadata), an ancestor is a non-directory, a whiteout
(``.wh.NAME``) or an opaque directory (``.wh..wh..opq``) higher up. Because every higher layer
has been read when an entry streams past, a surviving entry is final at once: `entries()`
yields it with its file content readable from the tar stream, so a sink (the squashfs writer,
a tar writer) takes the bytes without anything being extracted or held in memory. When the
iteration ends, `root` is the complete tree (`squashstore.tree`). Hard links join one
`Inode`; a link whose target a higher layer shadowed gets the content from a second read of
that layer. Hostile paths are normalised like Docker does (absolute paths kept inside the
root) or rejected (``..`` above the root, entries below a non-directory of the same layer,
links out of the layer); owners, modes, devices and xattrs are kept without root. Whiteouts
follow podman's overlay driver, which makes each one a device at the hidden path as it
extracts the layer: a whiteout of a path its own layer already has, a bare ``.wh.`` (it names
its own directory) or an entry below a whiteout refuses the layer, and a later entry at a
whiteout's path replaces it.
"""

from __future__ import annotations

import io
import posixpath
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar, cast

from squashstore.image import Layer, LayerError
from squashstore.tar import format as tarformat
from squashstore.tar.format import OPAQUE_MARKER, WHITEOUT_PREFIX, quote
from squashstore.tar.reader import Header, TarError, TarReader
from squashstore.tar.split import DiffFile
from squashstore.tree import Inode, Kind, name_bytes, new_dir

MAX_NAME = 255
MAX_FILE_SIZE = 1 << 46  # 64 TiB: larger than any real layer, smaller than absurd headers
_MAYBE_LONG = re.compile(rf"[^/]{{{MAX_NAME // 4 + 1},}}")
"""Path parts that may be longer than MAX_NAME bytes (a character is at most 4 bytes)."""
_SHORT = MAX_NAME // 4
"""A path of at most this many characters has no part longer than MAX_NAME bytes."""
_CACHE_LIMIT = 4096
"""Entries of each path-lookup cache of the merge before it starts afresh (memory bound)."""
_CACHE_CHARS = 1 << 22
"""About the most characters of paths each such cache holds: deep paths make it start
afresh sooner (4,096 paths 10,000 deep would be 80 MB). It starts again from the path just
looked up, the parent of the next one in tree order, so no walk from the root follows."""


def _full(cache: dict[str, Any], path: str) -> bool:
    """Whether `cache` must start afresh before it takes `path`."""
    return len(cache) >= _CACHE_LIMIT or len(cache) * len(path) >= _CACHE_CHARS


@dataclass(slots=True)
class MergedEntry:
    """One surviving entry, in stream order. `content` is readable only until the next one."""

    path: str
    """Relative path without a leading slash (the root itself is never yielded)."""
    inode: Inode
    content: IO[bytes] | None = None
    """A regular file's bytes (``inode.size`` of them), for the first name of its inode."""
    link_to: str | None = None
    """For a further name of an already yielded inode: the path it was first yielded at."""


@dataclass(slots=True)
class _Upper:
    """What the layers above the current one say about a path (a trie node)."""

    kind: str | None = None
    """``"dir"``, ``"other"``, or None when only implied by deeper paths."""
    hides_below: bool = False
    """A whiteout or opaque marker above: nothing of this path's lower subtree survives."""
    children: dict[str, _Upper] = field(default_factory=dict)


@dataclass
class _LayerState:
    """Paths the current layer has, and what it hides from the layers below it."""

    kinds: dict[str, str] = field(default_factory=dict)
    whiteouts: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)
    yielded: dict[str, Inode] = field(default_factory=dict)
    """Surviving paths of this layer and their inodes (hard-link targets)."""
    hidden_files: set[str] = field(default_factory=set)
    """Non-directories of this layer that a higher layer shadowed."""
    pending_links: dict[str, list[str]] = field(default_factory=dict)
    """Shadowed link target -> surviving link paths waiting for its content."""
    link_of: dict[str, str] = field(default_factory=dict)
    """Hard-link member path -> the path of the member holding the content."""
    restate: set[str] = field(default_factory=set)
    """Yielded files whose metadata a shadowed link of this layer changed afterwards."""
    implied: set[str] = field(default_factory=set)
    """Directories this layer created only because entries lie below them."""
    link_headers: dict[str, list[Header]] = field(default_factory=dict)
    """Shadowed link target -> the headers of the links to it, in tar order."""
    names: set[str] = field(default_factory=set)
    """Every entry's name as containers/storage's tar-split records it (Go's Clean)."""
    clean: dict[str, None] = field(default_factory=dict)
    """A cache: directories none of whose ancestors (or themselves) is a non-directory of
    this layer, so checking an entry's parents stops at the nearest one of them."""
    upper: dict[str, _Upper | bool] = field(default_factory=dict)
    """A cache of `LayerMerge._upper_state` while this layer is read (the trie of the
    layers above does not change meanwhile)."""

    def set_kind(self, path: str, kind: str) -> None:
        if kind == "other" and path in self.kinds:
            self.clean.clear()  # an implied directory became a non-directory
        self.kinds[path] = kind


def normalise(name: str, layer: Layer) -> str:
    """A tar member name as a clean relative path; LayerError when it leaves the root."""
    path = posixpath.normpath("/" + name) if name.startswith("/") else posixpath.normpath(name)
    path = path.lstrip("/")
    if path == ".":
        return ""
    if path == ".." or path.startswith("../"):
        raise LayerError(f"{layer.describe()}: entry {quote(name)} points outside the root")
    if len(path) > _SHORT and _long_part(path) is not None:
        raise LayerError(f"{layer.describe()}: name longer than {MAX_NAME} bytes in "
                         f"{quote(name)}")
    return path


def _long_part(path: str) -> str | None:
    """A part of `path` longer than MAX_NAME bytes, if it has one. One C-level scan, not a
    Python loop over the parts: a 10,000-deep path stays cheap."""
    for match in _MAYBE_LONG.finditer(path):
        if len(name_bytes(match.group())) > MAX_NAME:
            return match.group()
    return None


def go_clean(name: str) -> str:
    """Go's filepath.Clean (how tar-split keys the entries it refuses to see twice)."""
    cleaned = posixpath.normpath(name)
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _step(node: _Upper | bool, name: str) -> _Upper | bool:
    """From what the layers above say about a directory to what they say about its child
    `name` (see `LayerMerge._upper_state`)."""
    if isinstance(node, bool):
        return node
    if node.kind == "other" or node.hides_below:
        return True
    child = node.children.get(name)
    return False if child is None else child

N = TypeVar("N")


def _from_nearest(path: str, cache: dict[str, N], root: N,
                  step: Callable[[N, str], N]) -> N:
    """What `step` finds at `path` from `root`, name by name, starting at the nearest
    ancestor in `cache` (so a deep path costs one step, not its depth) and caching the
    result (the cache starts afresh when `_full`, bounding its memory)."""
    if not path:
        return root
    found = cache.get(path)
    if found is not None:
        return found
    names: list[str] = []
    prefix, node = path, root
    while prefix:
        hit = cache.get(prefix)
        if hit is not None:
            node = hit
            break
        prefix, _, name = prefix.rpartition("/")
        names.append(name)
    for name in reversed(names):
        node = step(node, name)
    if _full(cache, path):
        cache.clear()
    cache[path] = node
    return node



_TAR_KINDS = {
    tarformat.TYPE_REG: Kind.FILE,
    tarformat.TYPE_DIR: Kind.DIR,
    tarformat.TYPE_SYMLINK: Kind.SYMLINK,
    tarformat.TYPE_CHAR: Kind.CHARDEV,
    tarformat.TYPE_BLOCK: Kind.BLOCKDEV,
    tarformat.TYPE_FIFO: Kind.FIFO,
}
"""The entry types containers/storage extracts (besides hard links and global headers);
it refuses every other type (``unhandled tar header type``): ``S``, ``7``, ``D``, ``V``..."""


_NO_CHANGE = (1 << 32) - 1
_DEVICES = (Kind.CHARDEV, Kind.BLOCKDEV)
"""chown's "leave unchanged" id, (uid_t)-1: the file keeps extraction's owner, root."""


def _owner(value: int) -> int:
    """An owner id as extraction's lchown leaves it: the kernel takes the low 32 bits (podman
    shows uid 2**33 as 0), and -1 changes nothing."""
    value &= _NO_CHANGE
    return 0 if value == _NO_CHANGE else value


def inode_from_member(member: Header, layer: Layer) -> Inode:
    """The metadata of a tar entry (not a hard link) as an `Inode`."""
    kind = _TAR_KINDS.get(member.typeflag)
    if kind is None:
        raise LayerError(f"{layer.describe()}: {quote(member.name)}: unhandled tar header type "
                         f"{ord(member.typeflag) if member.typeflag else 0}")
    uid, gid, xattrs = member.uid & _NO_CHANGE, member.gid & _NO_CHANGE, member.xattrs
    if kind is Kind.FILE:
        if not 0 <= member.size <= MAX_FILE_SIZE:
            raise LayerError(f"{layer.describe()}: {quote(member.name)} has an absurd size "
                             f"{member.size}")
        return Inode(kind, member.mode & 0o7777, 0 if uid == _NO_CHANGE else uid,
                     0 if gid == _NO_CHANGE else gid, member.mtime, member.size, "", (0, 0),
                     dict(xattrs) if xattrs else {})
    inode = Inode(
        kind,
        # Linux symlinks are always 0777: no lchmod (podman shows 0777 whatever the header).
        0o777 if kind is Kind.SYMLINK else member.mode & 0o7777,
        0 if uid == _NO_CHANGE else uid,  # as `_owner`
        0 if gid == _NO_CHANGE else gid,
        member.mtime,
        0,
        member.linkname if kind is Kind.SYMLINK else "",
        (member.devmajor, member.devminor) if kind in _DEVICES else (0, 0),
        dict(xattrs) if xattrs else {},
    )
    if kind is Kind.DIR:
        inode.children = {}
    return inode


def _metadata(inode: Inode) -> tuple[object, ...]:
    return inode.mode, inode.uid, inode.gid, inode.mtime, dict(inode.xattrs)


def _copy_metadata(directory: Inode, source: Inode) -> None:
    directory.mode, directory.uid, directory.gid = source.mode, source.uid, source.gid
    directory.mtime, directory.xattrs = source.mtime, source.xattrs


def apply_link_header(inode: Inode, member: Header) -> None:
    """What extracting hard link `member` does to the inode it links to."""
    inode.uid, inode.gid = _owner(member.uid), _owner(member.gid)
    inode.xattrs.update(member.xattrs)
    if inode.kind is not Kind.SYMLINK:  # no lchmod, and chtimes follows links
        inode.mode = member.mode & 0o7777
        inode.mtime = member.mtime


class _Content(io.RawIOBase):
    """A member's bytes; a broken or truncated layer becomes a LayerError naming it."""

    def __init__(self, tar: TarReader, layer: Layer, name: str) -> None:
        super().__init__()
        self._tar, self._layer, self._name = tar, layer, name

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._tar.read(-1 if size is None else size)
        except (TarError, EOFError, zlib.error) as exc:
            raise LayerError(f"{self._layer.describe()}: content of {quote(self._name)} is "
                             f"truncated or corrupt ({exc})") from exc

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _members(tar: TarReader, layer: Layer) -> Iterator[Header]:
    """The entries of `tar` as Go's reader returns them (PAX global headers included);
    a stream podman's reader refuses becomes a LayerError."""
    while True:
        try:
            member = tar.next()
        except TarError as exc:
            raise LayerError(f"{layer.describe()}: not a valid tar stream: {exc}") from exc
        if member is None:
            return
        yield member


def content_source(content: IO[bytes] | None) -> DiffFile | None:
    """Where a merged entry's `content` lies, when its layer can say instead of giving the
    bytes (a layer of podman's store: the file in its diff directory); then the content
    counts as read and the caller reads the file itself. None: read `content`. Ask before
    the next entry, and before reading any of it."""
    if not isinstance(content, _Content):
        return None
    return cast("DiffFile | None", content._tar.take_reference())


def _content(tar: TarReader, member: Header, layer: Layer) -> IO[bytes]:
    return cast(IO[bytes], _Content(tar, layer, member.name))


_NOT_TARGETS = (tarformat.TYPE_LINK, tarformat.TYPE_XGLOBAL)
_FAST_TYPES = frozenset(_TAR_KINDS)
"""Entry types `LayerMerge._merge_layer`'s fast path takes (not links, not global headers)."""


class LayerMerge:
    """Flatten `layers` (bottom first, as in the manifest) by reading them top first."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        self.root: Inode = new_dir()
        self._implicit: set[int] = {id(self.root)}
        self._upper = _Upper(kind="dir")
        self._first_path: dict[int, str] = {}
        self._dirs: dict[str, Inode] = {}
        """A cache of `_directory`: path -> the directory there in `root`."""
        self.files = 0
        self.bytes = 0
        self.layers_done = 0

    # -- the stream --------------------------------------------------------------------
    def entries(self) -> Iterator[MergedEntry]:
        """Yield every surviving entry; afterwards `root` holds the finished tree."""
        for index in range(len(self.layers) - 1, -1, -1):
            yield from self._merge_layer(self.layers[index], last=index == 0)
            self.layers_done += 1
        yield from self._finish_implicit()

    def _merge_layer(self, layer: Layer, last: bool = False) -> Iterator[MergedEntry]:
        """Yield what survives of `layer`; unless it is the `last` (the bottom one), add
        what it shadows to the view of the layers above (nothing below would ask: the
        bottom layer, usually the largest, skipped ~80,000 trie steps)."""
        state = _LayerState()
        names, kinds, whiteouts, clean = state.names, state.kinds, state.whiteouts, state.clean
        with layer.open() as stream:
            tar = TarReader(stream)
            for member in _members(tar, layer):
                # The usual entry takes the fast path: a clean name (no leading slash, no
                # empty, "." or ".." part, no part starting with a dot: so no whiteout),
                # not a hard link, a new path, its parent already checked and made. It
                # does what `_member` does for such an entry, minus the checks that
                # cannot fire; everything else goes through `_member`.
                name = member.name
                if (member.typeflag in _FAST_TYPES and name and name[0] != "/"
                        and name[0] != "." and "//" not in name and "/." not in name):
                    path = name[:-1] if name[-1] == "/" else name
                    parent, _, base = path.rpartition("/")
                    if (path not in names and path not in kinds and path not in whiteouts
                            and (not parent or parent in clean)
                            and (len(path) <= _SHORT or _long_part(path) is None)):
                        names.add(path)
                        inode = inode_from_member(member, layer)
                        is_dir = inode.kind is Kind.DIR
                        kinds[path] = "dir" if is_dir else "other"
                        if is_dir:
                            # A directory below a clean one is clean: its entries take
                            # this path too (not only from the second one on).
                            if _full(clean, path):
                                clean.clear()
                            clean[path] = None
                        if (self._upper.children or self._upper.hides_below) and \
                                self._hidden(path, is_dir, state):
                            if not is_dir:
                                state.hidden_files.add(path)
                            continue
                        state.yielded[path] = inode
                        yield self._place_at(path, parent, base, inode,
                                             _content(tar, member, layer)
                                             if inode.kind is Kind.FILE else None)
                        continue
                yield from self._member(tar, member, layer, state)
        if state.pending_links:
            yield from self._resolve_pending(layer, state)
        if state.restate:
            yield from self._restate(layer, state)
        if not last:
            self._absorb(state)

    def _member(self, tar: TarReader, member: Header, layer: Layer,
                state: _LayerState) -> Iterator[MergedEntry]:
        key = go_clean(member.name)
        if key in state.names:
            # tar-split (containers/storage's recorder) refuses a layer naming a path twice.
            raise LayerError(f"{layer.describe()}: {quote(member.name)} appears twice in the "
                             "layer (duplicates of file paths not supported)")
        state.names.add(key)
        path = normalise(member.name, layer)
        if not path and key == "." and member.typeflag != tarformat.TYPE_DIR:
            return  # containers/storage skips an entry named "." whatever its type
        if member.typeflag == tarformat.TYPE_XGLOBAL:
            # Ignored, but extraction still makes its parent directories (a GNU tar global
            # header is named /tmp/GlobalHead.PID.N) and would replace a root named "/".
            if not path:
                raise LayerError(f"{layer.describe()}: the root {quote(member.name)} is not "
                                 "a directory")
            self._check_parents(path, layer, state)
            yield from self._imply_parents(path, member.mtime, state)
            return
        base = path.rpartition("/")[2]
        if base.startswith(WHITEOUT_PREFIX):
            self._check_parents(path, layer, state)
            yield from self._imply_parents(path, member.mtime, state)
            if base == OPAQUE_MARKER:
                state.opaque.add(_parent(path))
                return
            name = base[len(WHITEOUT_PREFIX):]
            hidden = posixpath.join(_parent(path), name)
            if not name or hidden in state.kinds:
                # podman's overlay driver makes a whiteout by mknod of the hidden path, which
                # fails when the layer already has it; a bare ".wh." names the directory it
                # lies in (or the root), which always exists.
                what = "its own directory" if not name else "an entry of its own layer"
                raise LayerError(f"{layer.describe()}: whiteout {quote(member.name)} names "
                                 f"{what} (podman refuses it: file exists)")
            state.whiteouts.add(hidden)
            return
        # A later entry replaces a whiteout of its own layer (extraction removes the device
        # first): a directory there merges with the lower one again, as podman shows.
        state.whiteouts.discard(path)
        if path == "" and member.typeflag != tarformat.TYPE_DIR:
            raise LayerError(f"{layer.describe()}: the root {quote(member.name)} is not a "
                             "directory")
        if path in state.kinds and path not in state.implied:
            # Two spellings of one path ("/a" and "a"): podman would keep the later one, which
            # a stream cannot take back; refused like a repeated name.
            raise LayerError(f"{layer.describe()}: {quote(member.name)} appears twice in the "
                             "layer (duplicates of file paths not supported)")
        self._check_parents(path, layer, state)
        yield from self._imply_parents(path, member.mtime, state)
        if member.typeflag == tarformat.TYPE_LINK:
            yield from self._hard_link(member, path, layer, state)
            return
        inode = inode_from_member(member, layer)
        if inode.kind is Kind.DIR and path in state.implied:
            # The layer names a directory it had implied: extraction sets its metadata.
            state.implied.discard(path)
            existing = state.yielded.get(path)
            if existing is not None:
                _copy_metadata(existing, inode)
                yield MergedEntry(path, existing)  # again: in a tar, the later header wins
            return
        state.set_kind(path, "dir" if inode.kind is Kind.DIR else "other")
        if self._hidden(path, inode.kind is Kind.DIR, state):
            if inode.kind is not Kind.DIR:
                state.hidden_files.add(path)
            return
        state.hidden_files.discard(path)
        if not path:
            self._fill_implicit(self.root, inode)  # the root's metadata; never yielded
            return
        state.yielded[path] = inode
        content = _content(tar, member, layer) if inode.kind is Kind.FILE else None
        yield self._place(path, inode, content)

    def _imply_parents(self, path: str, mtime: int, state: _LayerState
                       ) -> Iterator[MergedEntry]:
        """Directories above `path` that this layer has no entry for. Extraction creates
        them (0755, root), so in the merged view they replace the lower layers' metadata."""
        missing = []
        parent = _parent(path)
        while parent and parent not in state.kinds:
            missing.append(parent)
            parent = _parent(parent)
        for directory in reversed(missing):
            state.kinds[directory] = "dir"
            state.implied.add(directory)
            if self._hidden(directory, True, state):
                continue
            inode = new_dir(mtime=mtime)
            state.yielded[directory] = inode
            yield self._place(directory, inode, None)

    def _check_parents(self, path: str, layer: Layer, state: _LayerState) -> None:
        """Reject an entry below a non-directory of its own layer (a path through a symlink).
        The walk up stops at a directory already checked, so deep paths cost linear time."""
        checked = parent = _parent(path)
        while parent and parent not in state.clean:
            if state.kinds.get(parent) == "other":
                raise LayerError(f"{layer.describe()}: entry {quote(path)} lies below "
                                 f"non-directory {quote(parent)}")
            if parent in state.whiteouts:
                raise LayerError(f"{layer.describe()}: entry {quote(path)} lies below a "
                                 f"whiteout of its own layer, {quote(parent)} (podman "
                                 "refuses it: not a directory)")
            parent = _parent(parent)
        if checked:
            if _full(state.clean, checked):
                state.clean.clear()
            state.clean[checked] = None

    def _hard_link(self, member: Header, path: str, layer: Layer,
                   state: _LayerState) -> Iterator[MergedEntry]:
        target = normalise(member.linkname, layer)
        target = state.link_of.get(target, target)
        state.link_of[path] = target
        if target in state.yielded:
            inode = state.yielded[target]
        elif target in state.hidden_files:
            inode = None
        else:
            raise LayerError(f"{layer.describe()}: hard link {quote(path)} points to "
                             f"{quote(member.linkname)}, which is not a file of this layer")
        if inode is not None and inode.kind is Kind.DIR:
            raise LayerError(f"{layer.describe()}: hard link {quote(path)} to a directory")
        state.set_kind(path, "other")
        # Extracting a link applies its own header to the shared inode, as containers/storage
        # does (chown, xattrs, chmod, chtimes on the new name), whether or not it survives.
        hidden = self._hidden(path, False, state)
        if inode is not None:
            before = _metadata(inode)
            apply_link_header(inode, member)
            if hidden and _metadata(inode) != before:
                # No later header of this entry carries the change: say it again at the end.
                state.restate.add(target)
        else:
            state.link_headers.setdefault(target, []).append(member)
        if hidden:
            state.hidden_files.add(path)
            return
        if inode is None:
            state.pending_links.setdefault(target, []).append(path)
            return
        state.yielded[path] = inode
        yield self._place(path, inode, None)

    def _resolve_pending(self, layer: Layer, state: _LayerState) -> Iterator[MergedEntry]:
        """Read `layer` again for link targets that a higher layer shadowed."""
        wanted = dict(state.pending_links)
        with layer.open() as stream:
            tar = TarReader(stream)
            for member in _members(tar, layer):
                if not wanted:
                    break
                if member.typeflag in _NOT_TARGETS or normalise(member.name, layer) not in wanted:
                    continue
                target = normalise(member.name, layer)
                links = wanted.pop(target)
                inode = inode_from_member(member, layer)
                for header in state.link_headers.get(target, ()):
                    if inode.kind is not Kind.SYMLINK:
                        apply_link_header(inode, header)
                content = _content(tar, member, layer) if inode.kind is Kind.FILE else None
                yield self._place(links[0], inode, content)
                for path in links[1:]:
                    yield self._place(path, inode, None)
        if wanted:
            raise LayerError(f"{layer.describe()}: hard-link target "
                             f"{quote(next(iter(wanted)))} vanished on the second read")

    def _restate(self, layer: Layer, state: _LayerState) -> Iterator[MergedEntry]:
        """Yield again, with their final metadata, files whose metadata a shadowed hard link
        changed after they streamed past: content from a second read of `layer`, then every
        other name as a link, so a tar stream's later headers carry the change."""
        wanted = set(state.restate)
        with layer.open() as stream:
            tar = TarReader(stream)
            for member in _members(tar, layer):
                if member.typeflag in _NOT_TARGETS:
                    continue
                path = normalise(member.name, layer)
                if path not in wanted:
                    continue
                wanted.discard(path)
                inode = state.yielded[path]
                content = _content(tar, member, layer) if inode.kind is Kind.FILE else None
                yield MergedEntry(path, inode, content=content)
                for name, other in state.yielded.items():
                    if other is inode and name != path:
                        yield MergedEntry(name, inode, link_to=path)
                if not wanted:
                    break
        if wanted:
            raise LayerError(f"{layer.describe()}: {quote(next(iter(wanted)))} vanished on "
                             "the second read")

    # -- shadowing ---------------------------------------------------------------------
    def _hidden(self, path: str, is_dir: bool, state: _LayerState) -> bool:
        """Whether the layers above shadow an entry of the current layer at `path`."""
        if not path:
            return False  # the root: `_place` keeps the highest layer's metadata
        parent, _, name = path.rpartition("/")
        node = _step(self._upper_state(parent, state.upper), name)
        if isinstance(node, bool):
            return node
        if node.hides_below or node.kind == "other":
            return True
        if node.kind == "dir":
            return True
        # Only implied by deeper paths above: a directory here supplies the metadata,
        # anything else is replaced by that implied directory.
        return not is_dir

    def _upper_state(self, path: str, cache: dict[str, _Upper | bool]) -> _Upper | bool:
        """What the layers above say about the place `path`: True when an ancestor hides
        everything below it, False when they have nothing there, else their trie node.
        Found from the nearest cached ancestor, so a deep path costs one step, not its
        depth (the walk from the root made a 10,000-deep layer take minutes)."""
        return _from_nearest(path, cache, self._upper, _step)

    def _absorb(self, state: _LayerState) -> None:
        """Add what the finished layer shadows to the view of the layers above."""
        cache: dict[str, _Upper] = {}
        for path, kind in state.kinds.items():
            node = self._upper_node(path, cache)
            if node.kind is None:
                node.kind = kind
            if kind == "other":
                # A non-directory cuts off the lower subtree, even under a directory above.
                node.hides_below = True
        for path in state.whiteouts | state.opaque:
            self._upper_node(path, cache).hides_below = True

    def _upper_node(self, path: str, cache: dict[str, _Upper]) -> _Upper:
        """The trie node of `path`, made where missing; from the nearest cached ancestor."""
        return _from_nearest(path, cache, self._upper,
                             lambda node, name: node.children.setdefault(name, _Upper()))

    # -- the tree ----------------------------------------------------------------------
    def _place(self, path: str, inode: Inode, content: IO[bytes] | None) -> MergedEntry:
        """Put a surviving entry into the tree and describe it for the sinks."""
        parent_path, _, name = path.rpartition("/")
        return self._place_at(path, parent_path, name, inode, content)

    def _place_at(self, path: str, parent_path: str, name: str, inode: Inode,
                  content: IO[bytes] | None) -> MergedEntry:
        """`_place`, with `path` already split into its parent and its name."""
        parent = self._dirs.get(parent_path) if parent_path else self.root
        if parent is None:
            parent = self._directory(parent_path, inode.mtime)
        children = parent.children
        assert children is not None
        existing = children.get(name)
        kind = inode.kind
        if existing is not None and existing.kind is Kind.DIR:
            if kind is Kind.DIR:
                self._fill_implicit(existing, inode)
                return MergedEntry(path, existing)
            self._dirs.clear()  # a directory is replaced: cached paths below it are stale
        children[name] = inode
        if kind is Kind.DIR:
            # Its entries come next: `_directory` finds it without a walk. A directory has
            # one name (no hard links to it), so no first path is kept for it: a deep tree
            # would hold every prefix of its deepest path.
            if _full(self._dirs, path):
                self._dirs.clear()
            self._dirs[path] = inode
            return MergedEntry(path, inode, content)
        first = self._first_path.setdefault(id(inode), path)
        if first != path:
            return MergedEntry(path, inode, None, first)
        if kind is Kind.FILE:
            self.files += 1
            self.bytes += inode.size
        return MergedEntry(path, inode, content)

    def _fill_implicit(self, directory: Inode, source: Inode) -> None:
        """Give a directory made implicitly (or the root) the metadata of its real entry."""
        if id(directory) not in self._implicit:
            return
        self._implicit.discard(id(directory))
        _copy_metadata(directory, source)

    def _directory(self, path: str, mtime: int) -> Inode:
        """The directory at `path`, made implicitly (0755, root) where missing; found from
        the nearest cached ancestor (entries come in tree order: usually the parent)."""
        cached = self._dirs.get(path) if path else self.root
        if cached is not None:
            return cached
        return _from_nearest(path, self._dirs, self.root,
                             lambda node, part: self._implied(node, part, mtime))

    def _implied(self, node: Inode, part: str, mtime: int) -> Inode:
        """The directory `part` of `node`, made implicitly where missing or not a directory."""
        assert node.children is not None
        child = node.children.get(part)
        if child is None or not child.is_dir():
            if child is not None:
                self._dirs.clear()
            child = new_dir(mtime=mtime)
            self._implicit.add(id(child))
            node.children[part] = child
        return child

    def _finish_implicit(self) -> Iterator[MergedEntry]:
        """Yield the directories that no layer described (so tar sinks write them too)."""
        if not self._implicit - {id(self.root)}:
            self._implicit.clear()  # at most the root, which is never yielded: no walk
            return
        stack: list[tuple[str, Inode]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            if id(node) in self._implicit and path:
                yield MergedEntry(path, node)
            assert node.children is not None
            for name, child in node.children.items():
                if child.is_dir():
                    stack.append((f"{path}/{name}" if path else name, child))
        self._implicit.clear()
