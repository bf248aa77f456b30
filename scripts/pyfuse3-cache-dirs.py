"""Patch an unpacked pyfuse3 3.5.0 source tree so the kernel may cache what never changes.

A squash image never changes, so the kernel may keep its listings and file contents for the
life of the mount without asking squashstore's server again. Stock pyfuse3 3.5.0 cannot say
so in two places (NOTES.md, "Container start and FUSE, continued" and the noopen section):

- its `opendir` reply carries only a file handle: it cannot set libfuse's `cache_readdir`
  and `keep_cache` flags (FOPEN_CACHE_DIR, FOPEN_KEEP_CACHE), so every listing of every
  directory reached the server again, on every walk. This sets both in
  `fuse_opendir_async`'s reply (the field is declared in Include/fuse_common.pxd).
- "no-open": a server that answers OPEN (OPENDIR) with ENOSYS is never sent OPEN and
  RELEASE (OPENDIR and RELEASEDIR) again, and the kernel then keeps the page cache
  (listings) by itself; but READ and READDIRPLUS then carry file handle 0, and pyfuse3
  hands its handlers only the handle, not the inode. This passes the inode number instead
  when the handle is 0 (`fuse_read`, `fuse_readdirplus`), and sets the module attribute
  `pyfuse3.squashstore_no_open = True` so the server knows it may answer ENOSYS.
- its `init` asks the kernel only for the capabilities it knows of: not for
  FUSE_CAP_CACHE_SYMLINKS, so every resolution of every symlink (a container's /bin ->
  usr/bin on each exec) reaches the server as READLINK again. This asks for it when the
  `Operations` object has a true `squashstore_cache_symlinks` attribute.

Two more edits only shorten every server's start (NOTES.md, "FUSE server on asyncio"):
`import pyfuse3` imported trio (~430 M instructions, and a forked ``ldconfig -p``) although
squashstore's server runs pyfuse3 on its own small loop (`squashstore.fuse.loop`, set as
the module's `trio` before `main`, as `pyfuse3.asyncio.enable()` does): `trio` is now
imported on its first use, which then never comes; and `pyfuse3.__version__` was looked up
through `importlib.metadata` (email, zipfile, csv, datetime) at import: it is now this
source's version, written in.

It fails loudly when the source is not the one it was written for, and a second run
changes nothing. Used by scripts/install; without it squashstore works the same (the
server sees the attribute missing and keeps OPEN/RELEASE), only slower.
"""

import sys
from pathlib import Path

TAG = "  # squashstore: the kernel may cache listings"
NO_OPEN = "  # squashstore: no-open, the inode stands for handle 0"
SYMLINKS = "  # squashstore: the kernel may cache symlink targets"
LIGHT = "  # squashstore: nothing imported that the server does not use"
VERSION = "3.5.0"
EDITS = (
    ("Include/fuse_common.pxd",
     "        unsigned int keep_cache\n",
     "        unsigned int keep_cache\n        unsigned int cache_readdir" + TAG + "\n"),
    ("src/pyfuse3/handlers.pxi",
     "        c.fi.fh = await operations.opendir(c.ino, ctx)\n"
     "    except FUSEError as e:\n"
     "        ret = fuse_reply_err(c.req, e.errno)\n"
     "    else:\n"
     "        ret = fuse_reply_open(c.req, &c.fi)\n",
     "        c.fi.fh = await operations.opendir(c.ino, ctx)\n"
     "    except FUSEError as e:\n"
     "        ret = fuse_reply_err(c.req, e.errno)\n"
     "    else:\n"
     "        c.fi.cache_readdir = 1" + TAG + "\n"
     "        c.fi.keep_cache = 1\n"
     "        ret = fuse_reply_open(c.req, &c.fi)\n"),
    ("src/pyfuse3/handlers.pxi",
     "    c.off = off\n"
     "    c.fh = fi.fh\n"
     "    save_retval(fuse_read_async(c))\n",
     "    c.off = off\n"
     "    c.fh = fi.fh if fi.fh else ino" + NO_OPEN + "\n"
     "    save_retval(fuse_read_async(c))\n"),
    ("src/pyfuse3/handlers.pxi",
     "    c.off = off\n"
     "    c.fh = fi.fh\n"
     "    save_retval(fuse_readdirplus_async(c))\n",
     "    c.off = off\n"
     "    c.fh = fi.fh if fi.fh else ino" + NO_OPEN + "\n"
     "    save_retval(fuse_readdirplus_async(c))\n"),
    ("Include/fuse_common.pxd",
     "      FUSE_CAP_HANDLE_KILLPRIV\n",
     "      FUSE_CAP_HANDLE_KILLPRIV\n      FUSE_CAP_CACHE_SYMLINKS" + SYMLINKS + "\n"),
    ("src/pyfuse3/handlers.pxi",
     "        conn.want |= FUSE_CAP_POSIX_ACL\n",
     "        conn.want |= FUSE_CAP_POSIX_ACL\n"
     "    if (getattr(operations, 'squashstore_cache_symlinks', False) and" + SYMLINKS + "\n"
     "        conn.capable & FUSE_CAP_CACHE_SYMLINKS):\n"
     "        conn.want |= FUSE_CAP_CACHE_SYMLINKS\n"),
    ("src/pyfuse3/__init__.pyx",
     "import sys\nimport trio\nimport threading\n",
     "import sys\nimport threading\n\n"
     "class _TrioOnFirstUse:" + LIGHT + "\n"
     "    '''trio, imported when first used: never when the caller sets this\n"
     "    module's `trio` to another loop's primitives before main().'''\n"
     "    def __getattr__(self, name):\n"
     "        global trio\n"
     "        import trio\n"
     "        return getattr(trio, name)\n\n"
     "trio = _TrioOnFirstUse()\n"),
    ("src/pyfuse3/_pyfuse3.py",
     "from importlib.metadata import PackageNotFoundError, version as package_version\n",
     "# importlib.metadata: not imported, see __version__" + LIGHT + "\n"),
    ("src/pyfuse3/_pyfuse3.py",
     "try:\n"
     "    __version__ = package_version('pyfuse3')\n"
     "except PackageNotFoundError:\n"
     "    __version__ = 'unknown'\n",
     f"__version__ = '{VERSION}'" + LIGHT + "\n"),
    ("src/pyfuse3/__init__.pyx",
     "ROOT_INODE = FUSE_ROOT_ID\n",
     "ROOT_INODE = FUSE_ROOT_ID\n"
     "squashstore_no_open = True" + NO_OPEN + "\n"),
)


def main(tree: Path) -> int:
    if f"\nVersion: {VERSION}\n" not in (tree / "PKG-INFO").read_text():
        print(f"pyfuse3-cache-dirs: {tree}: not pyfuse3 {VERSION}", file=sys.stderr)
        return 1
    texts: dict[str, str] = {}
    for name, old, new in EDITS:
        text = texts.get(name) or (tree / name).read_text()
        if new in text:
            continue
        if text.count(old) != 1:
            print(f"pyfuse3-cache-dirs: {tree / name}: not the pyfuse3 3.5.0 source this "
                  "patch was written for", file=sys.stderr)
            return 1
        texts[name] = text.replace(old, new)
    for name, text in texts.items():
        (tree / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
