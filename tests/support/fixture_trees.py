"""Fixture file-system trees and images, made here without any download.

`make_tree(dest, kind)` writes a plain directory tree (no podman) for squashfs writer and
reader tests; `build_fixture_images(podman, workdir)` builds the fixture images with the real
podman (``podman import`` of a busybox rootfs tar made with `tarfile`, then ``podman build``
with COPY and RUN steps) and returns ``{short name: image reference}``.

Every image starts from **base** (``localhost/sqs-fixture-base:latest``, ONE layer made by
``podman import``): /bin/busybox (from the host's busybox-static) with a relative symlink
/bin/NAME -> busybox for every applet (so RUN works), /etc/config, /opt/app/{a,b,c},
/data/file-then-dir (file), /data/dir-then-file/ (dir with a child), /hl/one and /hl/two (a
hard-link pair inside the layer), /xattr/user (``user.color``, ``user.binary`` = bytes 0..255),
/xattr/cap (``security.capability`` v2, cap_net_raw+ep), symlinks /links/rel -> ../etc/config,
/links/abs -> /etc/config, /links/dangling -> /nonexistent, /empty-file, /empty-dir/.
The layer counts below include that base layer; RUN steps of buildah also leave /dev, /proc,
/sys, /run and an empty /etc/hostname in their layer (image content, kept on export).

- **base** (1 layer): as above; config Env, Cmd, WorkingDir /, User 0:0, Labels,
  ExposedPorts 80/tcp set with ``podman import --change``.
- **whiteouts** (7 layers):
  L2 (COPY): /etc/config overwritten. L3 (COPY): /copied/new-file added.
  L4 (RUN): ``rm /opt/app/a`` -> whiteout /opt/app/.wh.a; /opt/app/b overwritten;
  ``rm -rf /data/dir-then-file`` then the same path as a file (dir replaced by file);
  ``rm /data/file-then-dir`` then the same path as a dir with a child (file replaced by dir;
  buildah writes it with an opaque marker /data/file-then-dir/.wh..wh..opq);
  ``rm -rf /empty-dir`` -> whiteout /.wh.empty-dir (a directory deleted).
  L5 (RUN): ``rm -rf /opt/app && mkdir /opt/app`` with new /opt/app/z -> opaque dir
  /opt/app/.wh..wh..opq; ``rm -rf /data/file-then-dir`` and a file again (dir back to file).
  L6 (RUN): ``rm -rf /hl`` -> whiteout /.wh.hl (a directory of hard links deleted).
  L7 (RUN): /hl recreated as a new directory with /hl/new (no opaque marker needed).
- **hardlinks** (5 layers):
  L2 (RUN): /links2/f1 with hard links f2, f3 and f4 (group inside one layer);
  ``ln /hl/one /hl/three`` (a link to a lower-layer file: overlay copies /hl/one up, so
  in the image /hl/one and /hl/three are one group and /hl/two is alone).
  L3 (RUN): ``echo new > /links2/f2`` (overwrite through one link: overlay copies f2 up
  alone, so f2 leaves the group).
  L4 (RUN): ``rm /links2/f3`` -> whiteout of one link; /links2/setuid with link
  setuid-link (mode 4755, uid 1234).
  L5 (RUN): ``ln -f /empty-file /links2/f4`` (a link replaced by a link to another file).
- **special** (3 layers):
  L2 (COPY): /xattr2/user (``user.color``=blue, ``user.binary`` = bytes 0..255),
  /xattr2/cap (``security.capability``) copied with their xattrs from the build context.
  L3 (RUN): owners 1234:5678 and 65534:65534 (and 42:43 on a symlink, ``chown -h``),
  modes 4755, 2755, 2770 (dir), 1777, 0000, 0640; symlinks
  relative, absolute and dangling; a fifo; devices c 1 3, c 4 64, b 7 0, b 259 1000
  (minor > 255); empty file, empty dir; names with spaces, UTF-8 non-ASCII, a 255-byte
  component, a deep path of over 1 KiB; a directory symlink.
- **big** (3 layers):
  L2 (RUN): /big/large (3 MiB + 5 bytes of varied content), /big/sparse (16 MiB with data at
  0, in the middle and at the end, holes between; sparse on disk, but containers/storage
  writes it into the layer tar as a plain 16 MiB member), /big/zeros (1 MiB of zeros).
  L3 (RUN): /many/ with 3000 empty and small files.

Configs of the built images set Env, Entrypoint and Cmd, WorkingDir, User, Labels and
ExposedPorts (the ``CONFIG_*`` constants; ExposedPorts also keep base's 80/tcp).

`make_tree` kinds (`TREE_KINDS`): "basic" (dirs, files, relative/absolute/dangling
symlinks, an empty file and dir), and "basic" plus "special" (fifo, char and block devices
incl. minor > 255, odd owners, setuid/setgid/sticky/0000 modes, ``user.*`` xattrs incl. an
empty and a binary value, ``security.capability``, an xattr on a directory, an owned
symlink), "names" (spaces, UTF-8, 255-byte component, deep path > 1 KiB), "hardlinks" (a
three-name group across directories, a hard-linked fifo), "big" (3 MiB file, 16 MiB sparse
file, 1 MiB of zeros, 3000-entry dir), and "full" (all of them). Every mtime is FIXED_MTIME.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from support.podman import Podman

BUSYBOX = Path("/bin/busybox")
PREFIX = "localhost/sqs-fixture-"
FIXTURE_NAMES = ("base", "whiteouts", "hardlinks", "special", "big")
LAYER_COUNTS = {"base": 1, "whiteouts": 7, "hardlinks": 5, "special": 3, "big": 3}

# v2 file capability: cap_net_raw (bit 13) permitted, effective flag set.
CAP_NET_RAW_EP = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")
XATTR_BINARY = bytes(range(256))

LONG_NAME = "L" * 250 + ".long"  # 255 bytes
UNICODE_NAME = "ünïcödé-日本語-ß"
SPACE_NAME = "name with  spaces "
DEEP_PARTS = tuple(f"deep{i:02d}-" + "d" * 190 for i in range(6))  # > 1 KiB in total
MANY = 3000
FIXED_MTIME = 1_600_000_000

# The config every built fixture image gets (base has its own, see `base_changes`).
CONFIG_ENV = ("SQS_FIXTURE=1", "PATH=/bin")
CONFIG_LABELS = {"org.example.fixture": "yes", "org.example.space": "a b"}
CONFIG_WORKDIR = "/work"
CONFIG_USER = "1234:5678"
CONFIG_EXPOSE = ("8080/tcp", "53/udp")
CONFIG_ENTRYPOINT = ("/bin/sh", "-c")
CONFIG_CMD = ("echo fixture",)


def image_ref(name: str) -> str:
    """The reference of fixture image `name`."""
    return f"{PREFIX}{name}:latest"


# ----------------------------------------------------------------------------- base rootfs tar


def _applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True, text=True)
    return sorted({a for a in out.stdout.split() if a and "/" not in a and a != "busybox"})


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **kw: object) -> None:
    data = kw.pop("data", None)
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = FIXED_MTIME
    for key, value in kw.items():
        setattr(info, key, value)
    if isinstance(data, bytes):
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _xattr_headers(xattrs: dict[str, bytes]) -> dict[str, str]:
    return {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}


def write_base_tar(dest: Path) -> Path:
    """The base image's rootfs as a tar (see the module docstring)."""
    d = tarfile.DIRTYPE
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("bin", "etc", "opt", "opt/app", "data", "data/dir-then-file", "hl",
                     "xattr", "links", "empty-dir", "tmp", "work"):
            _add(tf, name, d, mode=0o1777 if name == "tmp" else 0o755)
        info = tf.gettarinfo(str(BUSYBOX), "bin/busybox")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = FIXED_MTIME
        with BUSYBOX.open("rb") as f:
            tf.addfile(info, f)
        for applet in _applets():
            _add(tf, f"bin/{applet}", tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        _add(tf, "etc/config", data=b"base config\n")
        _add(tf, "etc/passwd", data=b"root:x:0:0:root:/:/bin/sh\n")
        for c in "abc":
            _add(tf, f"opt/app/{c}", data=f"app {c}\n".encode())
        _add(tf, "data/file-then-dir", data=b"a file for now\n")
        _add(tf, "data/dir-then-file/child", data=b"child\n")
        _add(tf, "hl/one", data=b"hard linked in base\n", mode=0o640, uid=7, gid=8)
        # containers/storage applies a link member's own header (mode, owner) to the shared
        # inode, so the link repeats the file's metadata as tar writers normally do.
        _add(tf, "hl/two", tarfile.LNKTYPE, linkname="hl/one", mode=0o640, uid=7, gid=8)
        _add(tf, "xattr/user", data=b"has user xattrs\n", pax_headers=_xattr_headers(
            {"user.color": b"red", "user.binary": XATTR_BINARY}))
        _add(tf, "xattr/cap", data=b"#!/bin/sh\n", mode=0o755, pax_headers=_xattr_headers(
            {"security.capability": CAP_NET_RAW_EP}))
        _add(tf, "links/rel", tarfile.SYMTYPE, linkname="../etc/config", mode=0o777)
        _add(tf, "links/abs", tarfile.SYMTYPE, linkname="/etc/config", mode=0o777)
        _add(tf, "links/dangling", tarfile.SYMTYPE, linkname="/nonexistent", mode=0o777)
        _add(tf, "empty-file", data=b"")
    return dest


# ----------------------------------------------------------------------------- Containerfiles


def _config_lines() -> str:
    labels = " ".join(f'{k}="{v}"' for k, v in CONFIG_LABELS.items())
    lines = [
        *(f"ENV {e}" for e in CONFIG_ENV),
        f"LABEL {labels}",
        f"EXPOSE {' '.join(CONFIG_EXPOSE)}",
        f"WORKDIR {CONFIG_WORKDIR}",
        "ENTRYPOINT [" + ", ".join(f'"{a}"' for a in CONFIG_ENTRYPOINT) + "]",
        "CMD [" + ", ".join(f'"{a}"' for a in CONFIG_CMD) + "]",
        f"USER {CONFIG_USER}",
    ]
    return "\n".join(lines) + "\n"


def _run(*commands: str) -> str:
    return "RUN " + " && \\\n    ".join(commands) + "\n"


def _from() -> str:
    return f"FROM {image_ref('base')}\n"


def whiteouts_containerfile() -> str:
    return (
        _from()
        + "COPY config /etc/config\nCOPY new-file /copied/new-file\n"
        + _run(
            "rm /opt/app/a",
            "echo 'b overwritten' > /opt/app/b",
            "rm -rf /data/dir-then-file",
            "echo 'now a file' > /data/dir-then-file",
            "rm /data/file-then-dir",
            "mkdir /data/file-then-dir",
            "echo inner > /data/file-then-dir/inner",
            "rm -rf /empty-dir",
        )
        + _run(
            "rm -rf /opt/app",
            "mkdir /opt/app",
            "echo z > /opt/app/z",
            "rm -rf /data/file-then-dir",
            "echo 'a file again' > /data/file-then-dir",
        )
        + _run("rm -rf /hl")
        + _run("mkdir /hl", "echo recreated > /hl/new")
        + _config_lines()
    )


def hardlinks_containerfile() -> str:
    return (
        _from()
        + _run(
            "mkdir /links2",
            "echo shared > /links2/f1",
            "ln /links2/f1 /links2/f2",
            "ln /links2/f1 /links2/f3",
            "ln /links2/f1 /links2/f4",
            "ln /hl/one /hl/three",
        )
        + _run("echo new > /links2/f2")
        + _run(
            "rm /links2/f3",
            "echo suid > /links2/setuid",
            "chown 1234:5678 /links2/setuid",
            "chmod 4755 /links2/setuid",
            "ln /links2/setuid /links2/setuid-link",
        )
        + _run("ln -f /empty-file /links2/f4")
        + _config_lines()
    )


def _deep_path() -> str:
    return "/deep/" + "/".join(DEEP_PARTS)


def special_containerfile() -> str:
    return (
        _from()
        + "COPY xattr2 /xattr2/\n"
        + _run(
            "mkdir /owners /modes /dev2 /names /sym",
            "echo odd > /owners/odd && chown 1234:5678 /owners/odd",
            "mkdir /owners/nobody-dir && chown 65534:65534 /owners/nobody-dir",
            "ln -s /etc/config /owners/link && chown -h 42:43 /owners/link",
            "echo s > /modes/setuid && chmod 4755 /modes/setuid",
            "echo g > /modes/setgid && chmod 2755 /modes/setgid",
            "mkdir /modes/sticky && chmod 1777 /modes/sticky",
            "mkdir /modes/setgid-dir && chmod 2770 /modes/setgid-dir",
            "echo n > /modes/none && chmod 0000 /modes/none",
            "echo r > /modes/0640 && chmod 0640 /modes/0640",
            "ln -s ../etc/config /sym/relative",
            "ln -s /etc/config /sym/absolute",
            "ln -s does/not/exist /sym/dangling",
            "ln -s /opt/app /sym/dir-link",
            "mkfifo /dev2/fifo",
            "mknod /dev2/null c 1 3",
            "mknod /dev2/tty0 c 4 64",
            "mknod /dev2/loop0 b 7 0",
            "mknod /dev2/bigminor b 259 1000",
            ": > /names/empty-file",
            "mkdir /names/empty-dir",
            f"echo space > '/names/{SPACE_NAME}'",
            f"echo unicode > '/names/{UNICODE_NAME}'",
            f"mkdir '/names/{UNICODE_NAME}-dir'",
            f"echo long > /names/{LONG_NAME}",
            f"mkdir -p {_deep_path()}",
            f"echo deep > {_deep_path()}/leaf",
        )
        + _config_lines()
    )


def big_containerfile() -> str:
    return (
        _from()
        + _run(
            "mkdir /big",
            "i=0; while [ $i -lt 3072 ]; do printf '%1023d\\n' $i; i=$((i+1)); done"
            " > /big/large",
            "printf 'tail!' >> /big/large",
            "printf start > /big/sparse",
            "printf middle | dd of=/big/sparse bs=1 seek=8388608 conv=notrunc 2>/dev/null",
            "truncate -s 16777210 /big/sparse",
            "printf 'end!!!' >> /big/sparse",
            "dd if=/dev/zero of=/big/zeros bs=1024 count=1024 2>/dev/null",
        )
        + _run(
            "mkdir /many",
            "cd /many",
            f"i=0; while [ $i -lt {MANY} ]; do"
            " if [ $((i % 10)) -eq 0 ]; then echo $i > f$i; else : > f$i; fi;"
            " i=$((i+1)); done",
        )
        + _config_lines()
    )


def _special_context(ctx: Path) -> None:
    x = ctx / "xattr2"
    x.mkdir()
    (x / "user").write_text("user xattrs via COPY\n")
    os.setxattr(x / "user", "user.color", b"blue")
    os.setxattr(x / "user", "user.binary", XATTR_BINARY)
    (x / "cap").write_text("#!/bin/sh\n")
    os.chmod(x / "cap", 0o755)
    os.setxattr(x / "cap", "security.capability", CAP_NET_RAW_EP)


def _whiteouts_context(ctx: Path) -> None:
    (ctx / "config").write_text("overwritten config\n")
    (ctx / "new-file").write_text("new\n")


CONTAINERFILES = {
    "whiteouts": (whiteouts_containerfile, _whiteouts_context),
    "hardlinks": (hardlinks_containerfile, None),
    "special": (special_containerfile, _special_context),
    "big": (big_containerfile, None),
}


def base_changes() -> list[str]:
    """``podman import --change`` instructions for the base image's config."""
    return [
        "ENV SQS_BASE=1",
        "ENV PATH=/bin",
        'LABEL org.example.base="yes"',
        "EXPOSE 80/tcp",
        "WORKDIR /",
        "USER 0:0",
        'CMD ["/bin/sh"]',
    ]


def build_fixture_images(podman: Podman, workdir: Path) -> dict[str, str]:
    """Build every fixture image in `podman` (contexts under `workdir`); name -> reference."""
    workdir.mkdir(parents=True, exist_ok=True)
    base_tar = write_base_tar(workdir / "base.tar")
    podman.import_tar(base_tar, image_ref("base"), *base_changes())
    images = {"base": image_ref("base")}
    for name, (containerfile, populate) in CONTAINERFILES.items():
        ctx = workdir / f"ctx-{name}"
        shutil.rmtree(ctx, ignore_errors=True)
        ctx.mkdir()
        (ctx / "Containerfile").write_text(containerfile())
        if populate is not None:
            populate(ctx)
        podman.build(ctx, image_ref(name))
        images[name] = image_ref(name)
    return images


# ----------------------------------------------------------------------------- plain trees


TREE_KINDS = ("basic", "special", "names", "hardlinks", "big", "full")


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _tree_basic(d: Path) -> None:
    (d / "etc").mkdir()
    _write(d / "etc" / "config", b"config\n")
    (d / "bin").mkdir()
    _write(d / "bin" / "tool", b"#!/bin/sh\necho tool\n", 0o755)
    (d / "empty-dir").mkdir()
    _write(d / "empty-file", b"")
    os.symlink("../etc/config", d / "bin" / "rel-link")
    os.symlink("/etc/config", d / "abs-link")
    os.symlink("/does/not/exist", d / "dangling")


def _tree_special(d: Path) -> None:
    s = d / "special"
    s.mkdir()
    os.mkfifo(s / "fifo")
    os.mknod(s / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(s / "loop0", 0o660 | 0o060000, os.makedev(7, 0))
    os.mknod(s / "bigminor", 0o600 | 0o060000, os.makedev(259, 1000))
    _write(s / "odd-owner", b"odd\n", 0o640, (1234, 5678))
    _write(s / "setuid", b"u\n", 0o4755, (1234, 5678))
    _write(s / "setgid", b"g\n", 0o2755)
    _write(s / "no-perms", b"n\n", 0o000)
    (s / "sticky").mkdir()
    os.chmod(s / "sticky", 0o1777)
    os.symlink("/etc/config", s / "owned-link")
    os.chown(s / "owned-link", 42, 43, follow_symlinks=False)
    _write(s / "user-xattrs", b"x\n")
    os.setxattr(s / "user-xattrs", "user.color", b"red")
    os.setxattr(s / "user-xattrs", "user.binary", XATTR_BINARY)
    os.setxattr(s / "user-xattrs", "user.empty", b"")
    _write(s / "capability", b"#!/bin/sh\n", 0o755)
    os.setxattr(s / "capability", "security.capability", CAP_NET_RAW_EP)
    (s / "xattr-dir").mkdir()
    os.setxattr(s / "xattr-dir", "user.on-dir", b"yes")


def _tree_names(d: Path) -> None:
    n = d / "names"
    n.mkdir()
    _write(n / SPACE_NAME, b"space\n")
    _write(n / UNICODE_NAME, b"unicode\n")
    (n / f"{UNICODE_NAME}-dir").mkdir()
    _write(n / LONG_NAME, b"long\n")
    deep = d / "deep" / Path(*DEEP_PARTS)
    deep.mkdir(parents=True)
    _write(deep / "leaf", b"deep\n")


def _tree_hardlinks(d: Path) -> None:
    h = d / "hardlinks"
    h.mkdir()
    _write(h / "a", b"linked\n", 0o640, (7, 8))
    os.link(h / "a", h / "b")
    (h / "sub").mkdir()
    os.link(h / "a", h / "sub" / "c")
    _write(h / "lonely", b"one link\n")
    os.mkfifo(h / "fifo")
    os.link(h / "fifo", h / "fifo-link")


def _tree_big(d: Path) -> None:
    b = d / "big"
    b.mkdir()
    _write(b / "large", b"".join(b"%1023d\n" % i for i in range(3072)) + b"tail!")
    with open(b / "sparse", "wb") as f:
        f.write(b"start")
        f.seek(8 << 20)
        f.write(b"middle")
        f.truncate(16777210)
        f.seek(0, 2)
        f.write(b"end!!!")
    _write(b / "zeros", bytes(1 << 20))
    many = d / "many"
    many.mkdir()
    for i in range(MANY):
        (many / f"f{i}").write_bytes(b"%d\n" % i if i % 10 == 0 else b"")


_TREES = {
    "basic": (_tree_basic,),
    "special": (_tree_basic, _tree_special),
    "names": (_tree_basic, _tree_names),
    "hardlinks": (_tree_basic, _tree_hardlinks),
    "big": (_tree_basic, _tree_big),
    "full": (_tree_basic, _tree_special, _tree_names, _tree_hardlinks, _tree_big),
}


def _fix_mtimes(root: Path) -> None:
    """Give everything below and including `root` the mtime FIXED_MTIME (children first)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME),
                     follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def make_tree(dest: Path, kind: str) -> Path:
    """Write plain directory tree `kind` (one of `TREE_KINDS`) into `dest` (created; must not
    exist or be empty) with every mtime FIXED_MTIME; needs root (devices, owners,
    ``security.capability``). "full" has every entry type: devices, fifos, owners, setuid/
    setgid/sticky, xattrs, hard links (also of a fifo), symlinks, names with spaces, UTF-8,
    255-byte components, a deep path over 1 KiB, a 3 MiB file, a sparse 16 MiB file and a
    directory of 3000 entries."""
    if kind not in _TREES:
        raise ValueError(f"unknown tree kind {kind!r}; choose from {TREE_KINDS}")
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    os.chmod(dest, 0o755)
    for step in _TREES[kind]:
        step(dest)
    _fix_mtimes(dest)
    return dest
