"""Patch an unpacked pyfuse3 3.5.0 source tree so directory opens let the kernel cache.

pyfuse3's `opendir` handler replies with a bare file handle: it cannot set libfuse's
`cache_readdir` and `keep_cache` flags (FOPEN_CACHE_DIR, FOPEN_KEEP_CACHE), so every
listing of every directory reaches squashstore's server again, on every walk (NOTES.md,
"Container start and FUSE, continued"). A squash image never changes, so the kernel may
keep listings for the life of the mount. This sets both flags in `fuse_opendir_async`'s
reply (src/pyfuse3/handlers.pxi; the field is declared in Include/fuse_common.pxd) and
fails loudly when the source is not the one it was written for. Used by scripts/install;
without it squashstore works the same, only its directory walks are slower.
"""

import sys
from pathlib import Path

TAG = "  # squashstore: the kernel may cache listings"
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
)


def main(tree: Path) -> int:
    texts = {}
    for name, old, new in EDITS:
        text = (tree / name).read_text()
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
