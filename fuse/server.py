"""The read-only FUSE file system over one squash file: `SquashOperations` and `serve`.

This module owns the answers the kernel gets: a pyfuse3 `Operations` subclass over a
`SquashReader`, run on `squashstore.fuse.loop.Loop`. FUSE inode numbers are the squashfs inode
numbers, except that the root's number and 1 trade places (FUSE's root is always 1), so hard
links are one inode and numbers are stable across mounts. The server keeps a compact
number -> inode-reference array for every inode the kernel has been told about, a bounded LRU
of decoded directory listings (name -> child), and leaves data blocks to the reader's bounded
caches. Nothing can change, so every reply carries timeouts far longer than any job, misses
are cached by the kernel as negative entries, opened files keep their page cache, and file
and directory handles are just inode numbers. With the pyfuse3 that scripts/install builds
(`NO_OPEN`), OPEN and OPENDIR are answered ENOSYS: the kernel then never sends OPEN,
RELEASE, OPENDIR or RELEASEDIR again, keeps file pages and listings by itself, and READ and
READDIRPLUS name the inode (nothing here keeps per-open state; writes are refused by the
``ro`` mount before they reach us). Data blocks decompress in worker threads so
reads of different files proceed in parallel whenever other requests wait; a lone reader, and
file tails (slices of shared, almost always cached fragment blocks), are answered on the
loop's thread, since a thread hop costs more than it saves there. A corrupt image part fails only
the request that touched it (EIO and one log line); the server stays up.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import signal
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from squashstore import host, tree
from squashstore.fuse.loop import Loop
from squashstore.squashfs.reader import SqInode, SquashfsError, SquashReader

log = logging.getLogger("squashstore.fuse")

TIMEOUT = 3.0e7
"""Entry and attribute timeout in seconds (about a year): the image never changes."""

NO_OPEN = bool(getattr(pyfuse3, "squashstore_no_open", False))
"""Whether this pyfuse3 passes the inode to `read` and `readdir` when the file handle is 0
(scripts/pyfuse3-cache-dirs.py): only then may OPEN and OPENDIR be answered ENOSYS."""

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class ServerOptions:
    """What a server may use and how it mounts."""

    cache_bytes: int = 16 << 20
    """Decompressed data blocks kept (the reader's LRU)."""
    metadata_cache_blocks: int = 1024
    """Decompressed 8 KiB metadata blocks kept."""
    dir_cache_entries: int = 200_000
    """Directory entries kept decoded, over all cached directories."""
    threads: int = 4
    """Worker threads decompressing data blocks at once (0: all on the loop's thread)."""
    no_open: bool = NO_OPEN
    """Answer OPEN and OPENDIR with ENOSYS (the kernel's no-open mode; needs `NO_OPEN`)."""
    allow_other: bool = False
    suid: bool = False
    dev: bool = False
    fsname: str = ""


def mount_options(opts: ServerOptions) -> set[str]:
    """The FUSE mount options for `opts` (read-only, kernel permission checks, named)."""
    out = {"ro", "default_permissions", "subtype=squashstore"}
    out.add("suid" if opts.suid else "nosuid")
    out.add("dev" if opts.dev else "nodev")
    if opts.allow_other:
        out.add("allow_other")
    if opts.fsname:
        out.add("fsname=" + escape_option(opts.fsname))
    return out


def escape_option(value: str) -> str:
    """`value` escaped for libfuse's comma-separated option parser."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class _Listing:
    """One directory's entries, decoded once: names in order, children, a name index, and
    each child's reply attributes once made (a warm ``find`` gets every directory's
    entries again on every walk, as readdirplus with attributes: pyfuse3 cannot let the
    kernel cache listings, see NOTES.md)."""

    __slots__ = ("attrs", "index", "names", "numbers", "refs")

    def __init__(self, names: list[bytes], refs: array[int], numbers: array[int]) -> None:
        self.names = names
        self.refs = refs
        self.numbers = numbers
        self.index = {name: i for i, name in enumerate(names)}
        self.attrs: list[pyfuse3.EntryAttributes | None] = [None] * len(names)

    def __len__(self) -> int:
        return len(self.names)


class _ListingCache:
    """Decoded directory listings by directory inode number, bounded by total entries."""

    def __init__(self, max_entries: int) -> None:
        self._max = max(1, max_entries)
        self._items: OrderedDict[int, _Listing] = OrderedDict()
        self._entries = 0

    def get(self, number: int) -> _Listing | None:
        listing = self._items.get(number)
        if listing is not None:
            self._items.move_to_end(number)
        return listing

    def put(self, number: int, listing: _Listing) -> None:
        old = self._items.pop(number, None)
        if old is not None:
            self._entries -= len(old)
        self._items[number] = listing
        self._entries += len(listing)
        while self._entries > self._max and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._entries -= len(dropped)


def _guard(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn every failure of a request handler into an errno reply (EIO, logged)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SquashfsError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class SquashOperations(pyfuse3.Operations):
    """pyfuse3 request handlers serving one `SquashReader` read-only."""

    # Ask for FUSE_POSIX_ACL: without it a kernel answers every POSIX ACL query on a mount
    # made inside a user namespace (rootless podman's) with EOPNOTSUPP, and fuse-overlayfs
    # then refuses every copy-up ("operation not supported"). With it the kernel reads the
    # ACL xattrs from us (ENODATA when the image has none) and checks them.
    enable_acl = True
    # Let the kernel keep symlink targets in its page cache (FUSE_CAP_CACHE_SYMLINKS): a
    # container resolves /bin -> usr/bin on every exec. Only the pyfuse3 that
    # scripts/install builds asks for it; a stock one ignores this.
    squashstore_cache_symlinks = True

    def __init__(self, reader: SquashReader, opts: ServerOptions | None = None) -> None:
        super().__init__()
        opts = opts or ServerOptions()
        self._reader = reader
        self._root = reader.root.number
        count = reader.superblock.inode_count
        self._refs = array("Q", bytes(8 * (count + 1)))
        """inode number -> inode reference + 1 (0: not yet seen)."""
        self._refs[self._root] = reader.root.ref + 1
        self._dirs = _ListingCache(opts.dir_cache_entries)
        self._xattr_cache: OrderedDict[int, dict[bytes, bytes]] = OrderedDict()
        self.loop = Loop(opts.threads)
        """The loop pyfuse3 runs on (`serve`); reads use its threads when `opts.threads`."""
        self._threaded = opts.threads > 0
        self._blocks = -(-reader.superblock.bytes_used // reader.block_size)
        self._in_threads = 0
        self._requests: select.poll | None = None
        self._no_open = opts.no_open and NO_OPEN

    def watch_requests(self, fuse_fd: int) -> None:
        """Decompress on the loop's thread whenever the kernel has no other request queued
        on `fuse_fd` and no read is in a worker thread (one reader alone: no thread hops)."""
        self._requests = select.poll()
        self._requests.register(fuse_fd, select.POLLIN)

    def _requests_waiting(self) -> bool:
        return self._requests is None or bool(self._requests.poll(0))

    # -- numbers and inodes ------------------------------------------------------------

    def fuse_ino(self, number: int) -> int:
        """The FUSE inode number of squashfs inode `number` (and back: it is an involution)."""
        if number == self._root:
            return pyfuse3.ROOT_INODE
        if number == pyfuse3.ROOT_INODE:
            return self._root
        return number

    def _remember(self, number: int, ref: int) -> None:
        self._refs[number] = ref + 1

    def _node(self, ino: int) -> SqInode:
        number = self.fuse_ino(ino)
        if not 0 < number < len(self._refs):
            raise pyfuse3.FUSEError(errno.ENOENT)
        ref = self._refs[number]
        if ref:
            return self._reader.inode(ref - 1)
        node = self._reader.inode_by_number(number)
        self._remember(number, node.ref)
        return node

    def _attrs(self, node: SqInode) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self.fuse_ino(node.number)
        attrs.entry_timeout = TIMEOUT
        attrs.attr_timeout = TIMEOUT
        attrs.st_mode = node.kind.ifmt | node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        if node.kind in (tree.Kind.BLOCKDEV, tree.Kind.CHARDEV):
            attrs.st_rdev = os.makedev(*node.rdev)
        attrs.st_size = node.size
        attrs.st_blksize = self._reader.block_size
        attrs.st_blocks = (node.size + 511) // 512
        ns = node.mtime * 1_000_000_000
        attrs.st_mtime_ns = ns
        attrs.st_ctime_ns = ns
        attrs.st_atime_ns = ns
        return attrs

    def _listing(self, directory: SqInode) -> _Listing:
        listing = self._dirs.get(directory.number)
        if listing is None:
            names: list[bytes] = []
            refs = array("Q")
            numbers = array("Q")
            for entry in self._reader.readdir(directory):
                names.append(entry.name)
                refs.append(entry.ref)
                numbers.append(entry.inode_number)
            listing = _Listing(names, refs, numbers)
            self._dirs.put(directory.number, listing)
        return listing

    def _directory(self, ino: int) -> SqInode:
        node = self._node(ino)
        if node.kind is not tree.Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _parent(self, directory: SqInode) -> SqInode:
        if directory.number == self._root:
            return directory
        return self._node(self.fuse_ino(directory.parent))

    def _child(self, number: int, ref: int) -> SqInode:
        if not 0 < number < len(self._refs):
            raise SquashfsError(f"{self._reader.path}: entry with bad inode number {number}")
        node = self._reader.inode(ref)
        if node.number != number:
            raise SquashfsError(
                f"{self._reader.path}: entry for inode {number} points to inode {node.number}"
            )
        self._remember(number, ref)
        return node

    def _child_attrs(self, listing: _Listing, pos: int) -> pyfuse3.EntryAttributes:
        """The reply attributes of entry `pos` of `listing`, made once (pyfuse3 copies them
        into each reply, and nothing in the image changes)."""
        attrs = listing.attrs[pos]
        if attrs is None:
            attrs = self._attrs(self._child(listing.numbers[pos], listing.refs[pos]))
            listing.attrs[pos] = attrs
        return attrs

    # -- metadata requests -------------------------------------------------------------

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        directory = self._directory(parent_inode)
        if name == b".":
            return self._attrs(directory)
        if name == b"..":
            return self._attrs(self._parent(directory))
        listing = self._listing(directory)
        pos = listing.index.get(name)
        if pos is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._child_attrs(listing, pos)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind is not tree.Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._reader.readlink(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to drop: the number -> reference array is all we keep per inode."""

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._no_open:  # the kernel keeps listings itself; READDIRPLUS names the inode
            raise pyfuse3.FUSEError(errno.ENOSYS)
        self._directory(inode)
        return inode

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory = self._directory(fh)
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attrs(directory), 1):
            return
        if start_id < 2 and not pyfuse3.readdir_reply(
            token, b"..", self._attrs(self._parent(directory)), 2
        ):
            return
        listing = self._listing(directory)
        names, made = listing.names, listing.attrs
        for pos in range(max(0, start_id - 2), len(names)):
            attrs = made[pos] or self._child_attrs(listing, pos)
            if not pyfuse3.readdir_reply(token, names[pos], attrs, pos + 3):
                return

    async def releasedir(self, fh: int) -> None:
        """Directory handles are inode numbers: nothing to release."""

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sb = self._reader.superblock
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._reader.block_size
        data.f_frsize = self._reader.block_size
        data.f_blocks = self._blocks
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = sb.inode_count
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- xattrs ------------------------------------------------------------------------

    def _xattrs(self, node: SqInode) -> dict[bytes, bytes]:
        if node.xattr is None:
            return {}
        cached = self._xattr_cache.get(node.xattr)
        if cached is None:
            cached = self._reader.xattrs(node)
            self._xattr_cache[node.xattr] = cached
            while len(self._xattr_cache) > 4096:
                self._xattr_cache.popitem(last=False)
        return cached

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self._xattrs(self._node(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._xattrs(self._node(inode)))

    # -- file content ------------------------------------------------------------------

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self._no_open:  # the kernel keeps pages itself and READ names the inode
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind is not tree.Kind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind is tree.Kind.DIR else errno.EIO)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        if off >= node.size:
            return b""
        try:
            if not self._threaded or (not self._reader.remote and (
                off >= node.block_count * self._reader.block_size
                or (not self._in_threads and not self._requests_waiting())
            )):
                # Only the tail (a slice of a fragment block that many small files share
                # and that is nearly always decompressed already), or nothing else to do:
                # a thread hop costs more than it saves. Not for a lazily pulled image,
                # whose read may wait on the registry: lookups and stats go on meanwhile.
                return self._reader.read(node, off, size)
            self._in_threads += 1
            try:
                return await self.loop.run_in_thread(self._reader.read, node, off, size)
            finally:
                self._in_threads -= 1
        except SquashfsError as exc:
            log.error("read of inode %d at %d: %s", node.number, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        """File handles are inode numbers: nothing to release."""


# ---------------------------------------------------------------------------------------
# The loop.


def lazy_unmount(mountpoint: Path) -> None:
    """Detach `mountpoint` here; the server keeps serving users elsewhere until they go."""
    message = host.fusermount_unmount(mountpoint, lazy=True, quiet=True)
    if message is not None:
        log.warning("fusermount3 -u -z %s: %s", mountpoint, message)


class _Signals:
    """SIGTERM/SIGINT/SIGHUP: detach the mount (exit follows when its last user is gone); a
    second signal ends the loop at once."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.detached = False

    def __call__(self, signum: int) -> None:
        log.info("signal %d: unmounting %s", signum, self.mountpoint)
        if self.detached:
            pyfuse3.terminate()
            return
        self.detached = True
        threading.Thread(target=lazy_unmount, args=(self.mountpoint,), daemon=True).start()


def serve(
    reader: SquashReader,
    mountpoint: Path,
    opts: ServerOptions,
    on_mounted: Callable[[], None] | None = None,
) -> None:
    """Mount `reader`'s image on `mountpoint` and serve it until it is unmounted (here, by a
    signal, or from outside). `on_mounted` runs once the kernel has the mount, before the
    loop starts answering (so it must not touch the mount itself)."""
    ops = SquashOperations(reader, opts)
    pyfuse3.trio = ops.loop  # type: ignore[attr-defined]  # as pyfuse3.asyncio.enable() does
    pyfuse3.init(ops, str(mountpoint), mount_options(opts))
    fuse_fd = _fuse_fd()
    if fuse_fd is not None:
        ops.watch_requests(fuse_fd)
    on_signal = _Signals(mountpoint)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        ops.loop.add_signal_handler(signum, on_signal)
    try:
        if on_mounted is not None:
            on_mounted()
        ops.loop.run(pyfuse3.main())
    finally:
        pyfuse3.close(unmount=_still_mounted(mountpoint))
    log.info("%s: unmounted, server exits", mountpoint)


def _fuse_fd() -> int | None:
    """This process's /dev/fuse descriptor (pyfuse3 does not expose its session's)."""
    found = host.open_descriptors_of("/dev/fuse")
    return found[0] if len(found) == 1 else None


def _still_mounted(mountpoint: Path) -> bool:
    """Whether this namespace still has a FUSE mount of ours on `mountpoint`."""
    entry = host.mount_table().get(os.path.realpath(mountpoint))
    return entry is not None and entry.fstype == "fuse.squashstore"

