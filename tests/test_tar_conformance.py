"""Layer tars of many shapes read by squashstore exactly as podman reads them.

Each archive is made here, by GNU tar (gnu, posix/pax, ustar, incremental, sparse 0.0, 0.1
and 1.0, long names and links), bsdtar (pax with xattrs and ACLs, ustar) or by hand
(repeated long-name headers and PAX records, malformed numbers, header-only archives,
global headers, sparse maps). podman is the oracle: ``podman import`` of the archive, then
``podman image mount``, listed path by path (type, mode, owner, size, mtime, target,
content, xattrs). squashstore must show the same tree, both through ``export`` (the tar
it writes) and ``squash`` (the squash file, mounted by the kernel); where podman refuses
the archive, squashstore refuses it too, in one line of reasonable length.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layers import make_layer
from test_sources import Layout

from squashstore.flatten import export_image, squash_image
from squashstore.image import Image, SquashstoreError
from squashstore.squashfs.writer import SquashOptions
from squashstore.tar.reader import TarError, TarReader
from squashstore.tar.writer import encode_header
from support import tarshapes as ts
from support.listing import Listing, canonical_from_dir, canonical_from_tar, diff_listings
from support.podman import Podman

MAX_ERROR = 400
"""Longest acceptable error line."""


# -- source trees and tools ---------------------------------------------------------------


def _tree(root: Path) -> Path:
    """Files of every kind, long names and targets, a hard link, xattrs and an ACL."""
    root.mkdir()
    long_dir = root / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 90)).write_bytes(b"long name\n")
    (root / "file").write_bytes(b"hello\n")
    (root / "exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec", 0o4755)
    os.link(root / "file", root / "hardlink")
    os.symlink("file", root / "link")
    os.symlink("/" + "t" * 120, root / "longlink")
    os.mkfifo(root / "fifo")
    os.chown(root / "file", 1000, 1001)
    (root / "xattr").write_bytes(b"x")
    os.setxattr(root / "xattr", "user.comment", b"value")
    subprocess.run(["setfacl", "-m", "u:1234:r", str(root / "xattr")], check=True)
    for path in [*root.rglob("*"), root]:
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return root


def _sparse_tree(root: Path) -> Path:
    root.mkdir()
    with open(root / "sparse", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data in the middle")
    os.utime(root / "sparse", (1_600_000_000, 1_600_000_000))
    return root


def _gnu(src: Path, dest: Path, *options: str) -> bytes:
    subprocess.run(["tar", *options, "-cf", str(dest), "-C", str(src), "."], check=True,
                   capture_output=True)
    return dest.read_bytes()


def _bsdtar(src: Path, dest: Path, fmt: str, *options: str) -> bytes:
    subprocess.run(["bsdtar", "--format", fmt, *options, "-cf", str(dest), "-C", str(src), "."],
                   check=True, capture_output=True)
    return dest.read_bytes()


# -- archives made by hand ----------------------------------------------------------------


def _file(name: str, data: bytes = b"x\n", **kw: object) -> bytes:
    return ts.entry("pax", name, "file", data=data, mtime=1_600_000_000,
                    **kw)  # type: ignore[arg-type]


def _pax_entry(records: list[tuple[str, str]], name: bytes, data: bytes = b"",
               typeflag: bytes = b"0", **kw: object) -> bytes:
    block = b"".join(ts.pax_record(k, v) for k, v in records)
    content = data + bytes(-len(data) % 512)
    return (ts.special(b"x", block) if records else b"") + ts.header(
        name, typeflag, size=len(data), mtime=1_600_000_000, **kw) + content  # type: ignore[arg-type]


def _sparse_1_0(realsize: int, extents: list[tuple[int, bytes]], size_record: bool = True,
                map_text: bytes | None = None) -> bytes:
    """A PAX GNU sparse 1.0 entry (as GNU tar writes it, optionally with a ``size``)."""
    text = map_text if map_text is not None else (
        f"{len(extents)}\n".encode()
        + b"".join(f"{off}\n{len(d)}\n".encode() for off, d in extents))
    body = text + bytes(-len(text) % 512) + b"".join(d for _, d in extents)
    records = [("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
               ("GNU.sparse.name", "sparse"), ("GNU.sparse.realsize", str(realsize))]
    if size_record:
        records.append(("size", str(len(body))))
    return _pax_entry(records, b"./GNUSparseFile.0/sparse", body)


def _cases(tmp: Path) -> dict[str, bytes]:
    """Case name -> layer tar bytes."""
    tmp.mkdir()
    tree = _tree(tmp / "tree")
    sparse = _sparse_tree(tmp / "sparse-tree")
    incr = tmp / "incr"
    incr.mkdir()
    (incr / "input.txt").write_bytes(b"incremental\n")
    os.utime(incr / "input.txt", (1_600_000_000, 1_600_000_000))
    (incr / "sub").mkdir()
    (incr / "sub" / "g").write_bytes(b"g\n")
    out = tmp / "out.tar"
    cases: dict[str, bytes] = {
        "gnu-tar gnu": _gnu(tree, out, "--format=gnu"),
        "gnu-tar posix xattrs acls": _gnu(tree, out, "--format=posix", "--xattrs",
                                          "--xattrs-include=*", "--acls"),
        "gnu-tar ustar": _gnu(tree, out, "--format=ustar", "--exclude=./longlink"),
        "gnu-tar oldgnu": _gnu(tree, out, "--format=oldgnu"),
        "gnu-tar v7": _gnu(sparse, out, "--format=v7"),
        "gnu-tar incremental (atime/ctime in the GNU header)": subprocess.run(
            ["tar", "--format=gnu", "--incremental", "--atime-preserve", "-cf", "-", "-C",
             str(incr), "input.txt"], check=True, capture_output=True).stdout,
        "gnu-tar incremental, only the root as type D": _gnu(
            sparse, out, "--format=gnu", "--incremental"),
        "gnu-tar incremental, directories as type D": _gnu(
            incr, out, "--format=gnu", "--incremental"),
        "gnu-tar sparse 0.0": _gnu(sparse, out, "--format=posix", "--sparse",
                                   "--sparse-version=0.0"),
        "gnu-tar sparse 0.1": _gnu(sparse, out, "--format=posix", "--sparse",
                                   "--sparse-version=0.1"),
        "gnu-tar sparse 1.0": _gnu(sparse, out, "--format=posix", "--sparse",
                                   "--sparse-version=1.0"),
        "gnu-tar gnu sparse (type S)": _gnu(sparse, out, "--format=gnu", "--sparse"),
        "bsdtar pax xattrs acls": _bsdtar(tree, out, "pax"),
        "bsdtar ustar": _bsdtar(tree, out, "ustar", "--exclude", "./longlink"),
    }
    for shape in ("gnu-decoy", "pax-decoy-header", "pax-decoy-record"):
        cases[f"repeated long-name headers ({shape})"] = ts.archive(
            ts.entry(shape, "f" * 150, "file", data=b"real", mtime=1_600_000_000),
            ts.entry(shape, "s", "symlink", target="t" * 150, mtime=1_600_000_000),
            ts.entry(shape, "h", "link", target="f" * 150, mtime=1_600_000_000))
    cases["symlink modes 0000 and 0755"] = ts.archive(
        ts.entry("gnu", "a", "symlink", target="x", mode=0, mtime=1_600_000_000),
        ts.entry("pax", "b", "symlink", target="y", mode=0o755, mtime=1_600_000_000))
    cases["LIBARCHIVE.xattr only"] = ts.archive(_pax_entry(
        [("LIBARCHIVE.xattr.user.hidden", "dmFsdWU="), ("SCHILY.xattr.user.shown", "v")],
        b"f", b"x"))
    cases["PAX mtime with trailing garbage"] = ts.archive(
        _pax_entry([("mtime", "1600000000xyz")], b"f", b"x"))
    cases["PAX uid not a number"] = ts.archive(_pax_entry([("uid", "12a")], b"f", b"x"))
    cases["PAX uid -1 (chown leaves it)"] = ts.archive(_pax_entry([("uid", "-1")], b"f", b"x"))
    cases["PAX uid 2^33"] = ts.archive(_pax_entry([("uid", str(1 << 33))], b"f", b"x"))
    cases["PAX record with a bad length"] = ts.archive(
        ts.special(b"x", b"99 path=f\n") + ts.header(b"f", b"0"))
    cases["octal field with garbage"] = ts.archive(
        ts.header(b"f", b"0", raw={108: b"12x4567\x00"}))
    cases["PAX mtime with a fraction"] = ts.archive(
        _pax_entry([("mtime", "1600000000.999999999999")], b"f", b"x"))
    cases["header-only archive (PAX header, end marker)"] = ts.archive(
        ts.special(b"x", ts.pax_record("path", "nothing")))
    cases["empty archive"] = b""
    cases["end marker only"] = bytes(1024)
    cases["global headers"] = ts.archive(
        ts.special(b"g", ts.pax_record("mtime", "5") + ts.pax_record("uid", "77"),
                   b"pax_global_header"),
        _file("f"), _file("g"))
    cases["global header with a path record"] = ts.archive(
        ts.special(b"g", ts.pax_record("path", "/"), b"pax_global_header"), _file("f"))
    cases["PAX sparse 1.0 with a size record"] = ts.archive(
        _sparse_1_0(1000, [(500, b"abc")]))
    cases["PAX sparse 1.0 with a malformed map"] = ts.archive(
        _sparse_1_0(1000, [(500, b"abc")], map_text=b"1\n5x0\n3\n"))
    cases["PAX sparse map beyond the size"] = ts.archive(_sparse_1_0(100, [(500, b"abc")]))
    cases["PAX sparse data missing"] = ts.archive(
        _sparse_1_0(1000, [(500, b"abc")], map_text=b"1\n500\n9\n"))
    cases["a path twice"] = ts.archive(_file("f"), _file("f", b"again"))
    cases["a directory then a file"] = ts.archive(
        ts.entry("pax", "d", "dir", mode=0o755), _file("d"))
    cases["a file, a directory, a child"] = ts.archive(
        _file("d"), ts.entry("pax", "d", "dir", mode=0o755), _file("d/x"))
    cases["a name of 1 MiB"] = ts.archive(
        ts.special(b"L", b"n" * (1 << 20) + b"\x00", b"././@LongLink", "gnu"),
        ts.header(b"n", b"0", magic="gnu"))
    cases["contiguous file (type 7)"] = ts.archive(ts.header(b"c", b"7"))
    # Whiteouts: podman's overlay driver makes each a device at the hidden path (mknod).
    cases["a bare whiteout d/.wh."] = ts.archive(
        ts.entry("pax", "d", "dir", mode=0o755), _file("d/x"), _file("d/.wh.", b""))
    cases["a bare whiteout at the root"] = ts.archive(_file(".wh.", b""), _file("f"))
    cases["a whiteout of a file of its own layer"] = ts.archive(
        _file("d/x"), _file("d/.wh.x", b""))
    cases["an entry below a whiteout of its own layer"] = ts.archive(
        _file(".wh.d", b""), _file("d/x"))
    cases["a whiteout, then a directory at its path"] = ts.archive(
        _file(".wh.d", b""), ts.entry("pax", "d", "dir", mode=0o700, mtime=1_600_000_000),
        _file("d/x"))
    cases["truncated content"] = _file("f", b"z" * 2000)[:1200]
    cases["stream ending in the padding"] = _file("f", b"z" * 10)[:600]
    return cases


# -- the two readings ---------------------------------------------------------------------


def _podman_view(podman: Podman, tar: Path, tag: str) -> Listing | str:
    """podman's tree of the layer `tar`, or its error."""
    proc = podman.run("import", str(tar), tag, check=False)
    if proc.returncode != 0:
        return proc.stderr.decode(errors="replace").strip() or "refused"
    try:
        with podman.mount_image(tag) as point:
            return canonical_from_dir(point)
    finally:
        podman.run("rmi", "-f", tag, check=False)


def _image(data: bytes) -> Image:
    return Image("test", (), b"", "", b"", "", (make_layer(0, data),))


def _ours(data: bytes, tmp: Path, mount: Callable[[Path], Path]) -> tuple[Listing, Listing] | str:
    """squashstore's trees of the layer (export tar, squash file), or its error line."""
    out = io.BytesIO()
    try:
        export_image(_image(data), out)
    except SquashstoreError as exc:
        return str(exc)
    exported = canonical_from_tar(io.BytesIO(out.getvalue()))
    squash = tmp / "layer.sqfs"
    squash_image(_image(data), squash, SquashOptions())
    return exported, canonical_from_dir(mount(squash))


def test_every_archive_reads_as_podman_reads_it(podman: Podman, tmp_path: Path,
                                                mounted: Callable[[Path], Path]) -> None:
    cases = _cases(tmp_path / "src")
    problems: list[str] = []
    agreed_trees = agreed_refusals = 0
    for index, (name, data) in enumerate(cases.items()):
        tar = tmp_path / f"case{index}.tar"
        tar.write_bytes(data)
        theirs = _podman_view(podman, tar, f"localhost/conformance:{index}")
        (tmp_path / f"ours{index}").mkdir()
        ours = _ours(data, tmp_path / f"ours{index}", mounted)
        print(f"{name}: podman {'refuses: ' + theirs.splitlines()[-1][-160:] if isinstance(theirs, str) else 'accepts'}; squashstore {'refuses: ' + ours if isinstance(ours, str) else 'accepts'}")  # noqa: E501
        if isinstance(theirs, str) or isinstance(ours, str):
            if not isinstance(theirs, str):
                problems.append(f"{name}: squashstore refuses ({ours}), podman accepts")
            elif not isinstance(ours, str):
                problems.append(f"{name}: podman refuses ({theirs[-300:]}), squashstore "
                                "accepts")
            elif "\n" in ours or len(ours) > MAX_ERROR:
                problems.append(f"{name}: error line of {len(ours)} characters: "
                                f"{ours[:300]!r}")
            else:
                agreed_refusals += 1
            continue
        for how, listing in zip(("export", "squash"), ours, strict=True):
            differences = diff_listings(listing, theirs, ignore_paths={"/"})
            if differences:
                problems.append(f"{name} ({how}): " + "; ".join(differences[:8]))
        agreed_trees += 1
    assert not problems, "\n".join(problems)
    assert agreed_trees >= 20 and agreed_refusals >= 10, (agreed_trees, agreed_refusals)


def test_whiteouts_over_a_lower_layer_read_as_podman_reads_them(
        podman: Podman, tmp_path: Path, mounted: Callable[[Path], Path]) -> None:
    """A whiteout hides the lower layer's path, and a later entry of its own layer at that
    path replaces it: a directory there shows the lower directory's files again (podman's
    overlay driver removes the device before it makes the directory)."""
    lower = ts.archive(ts.entry("pax", "d", "dir", mode=0o755, mtime=1_600_000_000),
                       _file("d/old"), _file("e"), _file("gone"),
                       ts.entry("pax", "k", "dir", mode=0o755, mtime=1_600_000_000),
                       _file("k/kept"))
    upper = ts.archive(_file(".wh.d", b""), ts.entry("pax", "d", "dir", mode=0o700,
                                                     mtime=1_600_000_000),
                       _file("d/new"), _file(".wh.e", b""),
                       ts.entry("pax", "e", "dir", mode=0o755, mtime=1_600_000_000),
                       _file(".wh.gone", b""),
                       ts.entry("pax", "k", "dir", mode=0o755, mtime=1_600_000_000),
                       _file("k/.wh.kept", b""), _file("k/.wh.x", b""))
    layout = Layout(tmp_path / "oci")
    layout.write_index([layout.image([(lower, "none"), (upper, "none")])])
    pulled = podman.text("pull", f"oci:{tmp_path / 'oci'}").strip().splitlines()[-1]
    try:
        with podman.mount_image(pulled) as point:
            theirs = canonical_from_dir(point)
    finally:
        podman.run("rmi", "-f", pulled, check=False)
    assert "/d/old" in theirs and "/d/new" in theirs and "/gone" not in theirs
    image = Image("test", (), b"", "", b"", "", (make_layer(0, lower), make_layer(1, upper)))
    out = io.BytesIO()
    export_image(image, out)
    squash_image(image, tmp_path / "layer.sqfs", SquashOptions())
    for how, ours in (("export", canonical_from_tar(io.BytesIO(out.getvalue()))),
                      ("squash", canonical_from_dir(mounted(tmp_path / "layer.sqfs")))):
        differences = diff_listings(ours, theirs, ignore_paths={"/"})
        assert not differences, (how, differences[:8])


# -- the command line: one line, nothing left behind ---------------------------------------


def _layout(root: Path, layer: bytes, compression: str = "none") -> str:
    layout = Layout(root)
    layout.write_index([layout.image([(layer, compression)])])
    return f"oci:{root}"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "squashstore.cli.main", *args],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("case", ["a path twice", "a directory then a file",
                                  "a file, a directory, a child", "a name of 1 MiB",
                                  "a bare whiteout d/.wh."])
def test_refused_layers_one_line_and_no_output_from_every_command(case: str,
                                                                  tmp_path: Path) -> None:
    data = _cases(tmp_path / "src")[case]
    source = _layout(tmp_path / "oci", data)
    store = tmp_path / "store"
    assert _cli("--store", str(store), "init").returncode == 0
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    lines = []
    for command in (["export", source, "-o", str(tmp_path / "out.tar")],
                    ["squash", source, str(tmp_path / "out.sqfs")],
                    ["--store", str(store), "migrate", source]):
        result = _cli(*command)
        assert result.returncode == 1, (command, result.stderr)
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("squashstore: "), result.stderr[:500]
        assert len(err[0]) <= MAX_ERROR, err[0][:500]
        lines.append(err[0])
    assert all(("twice" in line) == ("twice" in lines[0]) for line in lines), lines
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    after = sorted(p.relative_to(store) for p in store.rglob("*")
                   if not p.name.endswith((".lock", ".log")))
    assert after == [p for p in before if not p.name.endswith((".lock", ".log"))]


@pytest.mark.parametrize("blob", ["gzip of nothing", "nothing"])
def test_a_layer_blob_of_nothing_is_an_empty_layer(blob: str, tmp_path: Path,
                                                   podman: Podman) -> None:
    """Go's archive/tar reads an empty stream as an empty archive; so does podman."""
    data = gzip.compress(b"", mtime=0) if blob.startswith("gzip") else b""
    tar = tmp_path / "layer.tar.gz"
    tar.write_bytes(data)
    theirs = _podman_view(podman, tar, "localhost/conformance:empty")
    assert not isinstance(theirs, str), theirs
    source = _layout(tmp_path / "oci", b"", "gzip" if blob.startswith("gzip") else "none")
    result = _cli("export", source, "-o", str(tmp_path / "out.tar"))
    assert result.returncode == 0, result.stderr
    assert not diff_listings(canonical_from_tar(tmp_path / "out.tar"), theirs,
                             ignore_paths={"/"})


# -- the header encoder: the canonical bytes, pinned against tarfile -----------------------

_NAMES = st.lists(st.sampled_from(["a", "/", "é", "\udcff", "x" * 30, ".", " "]),
                  min_size=1, max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(name=_NAMES, kind=st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6"]),
       mode=st.integers(0, 0o7777), uid=st.sampled_from([0, 1000, 8**7 - 1, 8**7, 1 << 32]),
       gid=st.sampled_from([0, 5, 8**7]), size=st.sampled_from([0, 1, 8**11 - 1, 8**11]),
       mtime=st.sampled_from([0, 1_600_000_000, -5, 8**11]), link=_NAMES,
       dev=st.sampled_from([(0, 0), (1, 3), (8**7 - 1, 259)]),
       xattrs=st.dictionaries(st.sampled_from(["user.a", "security.capability", "user.é"]),
                              st.binary(max_size=5), max_size=3))
def test_header_encoder_writes_the_bytes_tarfile_wrote(
        name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
        link: str, dev: tuple[int, int], xattrs: dict[str, bytes]) -> None:
    """The canonical tar's headers are part of every recorded diff_id and tar-split."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size, info.mtime = kind, mode, uid, gid, \
        size, mtime
    info.linkname, (info.devmajor, info.devminor) = link, dev
    info.uname = info.gname = ""
    info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                        for k, v in sorted(xattrs.items())}
    try:
        expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except ValueError:
        with pytest.raises(ValueError):
            encode_header(name, kind, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime,
                          linkname=link, devmajor=dev[0], devminor=dev[1], xattrs=xattrs)
        return
    assert encode_header(name, kind, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime,
                         linkname=link, devmajor=dev[0], devminor=dev[1],
                         xattrs=xattrs) == expected


# -- Go's reader rules, one by one ---------------------------------------------------------


def _read_all(data: bytes) -> list[tuple[bytes, str, str, int, int, bytes]]:
    reader = TarReader(io.BytesIO(data))
    out = []
    while (h := reader.next()) is not None:
        out.append((h.typeflag, h.name, h.linkname, h.size, h.mtime, reader.read()))
    return out


def test_reader_follows_go_on_names_and_numbers() -> None:
    gnu = ts.header(b"input.txt", b"0", magic="gnu", atime=0o13375561762, ctime=1)
    assert _read_all(ts.archive(gnu))[0][1] == "input.txt"
    ustar = ts.header(b"name", b"0", prefix=b"some/prefix")
    assert _read_all(ts.archive(ustar))[0][1] == "some/prefix/name"
    # Two PAX headers: the second replaces the first whole (its linkpath is gone too).
    two = ts.special(b"x", ts.pax_record("path", "first") + ts.pax_record("linkpath", "l1")) \
        + ts.special(b"x", ts.pax_record("path", "second")) + ts.header(b"h", b"2")
    assert _read_all(ts.archive(two))[0][1:3] == ("second", "")
    # A GNU long name beats a PAX path; an empty PAX value keeps the header's field.
    mixed = ts.special(b"x", ts.pax_record("path", "pax") + ts.pax_record("mtime", "")) \
        + ts.special(b"L", b"gnu\x00", b"././@LongLink", "gnu") \
        + ts.header(b"h", b"0", mtime=42)
    assert _read_all(ts.archive(mixed))[0][1:5] == ("gnu", "", 0, 42)
    # PAX times round down, also below zero.
    for value, seconds in (("1.5", 1), ("-1.5", -2), ("-0.5", -1), ("7", 7), ("-3", -3)):
        entry = ts.special(b"x", ts.pax_record("mtime", value)) + ts.header(b"f", b"0")
        assert _read_all(ts.archive(entry))[0][4] == seconds, value
    # A type-0 name ending in / is still a file; a NUL type ending in / is a directory.
    assert _read_all(ts.archive(ts.header(b"d/", b"\x00")))[0][0] == b"5"
    for bad in (ts.special(b"x", ts.pax_record("size", "+-1")) + ts.header(b"f", b"0"),
                ts.special(b"x", ts.pax_record("mtime", "1.5e3")) + ts.header(b"f", b"0"),
                ts.header(b"f", b"0", raw={124: b"0x10\x00"}),
                ts.header(b"f", b"0")[:150] + b"9" + ts.header(b"f", b"0")[151:],
                bytes(512) + ts.header(b"f", b"0")):
        with pytest.raises(TarError, match="invalid tar header"):
            _read_all(ts.archive(bad))


def test_reader_expands_sparse_files_without_reading_holes() -> None:
    entries = _read_all(ts.archive(_sparse_1_0(1000, [(500, b"abc")])))
    assert entries == [(b"0", "sparse", "", 1000, 1_600_000_000,
                        bytes(500) + b"abc" + bytes(497))]
    with pytest.raises(TarError, match="non-existent data"):
        _read_all(ts.archive(_sparse_1_0(1000, [(500, b"abc")], map_text=b"1\n500\n9\n")))


@pytest.mark.parametrize(("major", "minor"), [(1, 2**21), (2**21, 1), (5000, 2**20 + 5)])
def test_device_numbers_no_header_or_squashfs_holds_are_one_line(major: int, minor: int,
                                                                 tmp_path: Path) -> None:
    """A device node whose numbers fit GNU tar's base-256 fields but not squashfs's encoding
    (nor, past 2**21, the canonical tar's octal fields): one line, no output."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("dev/odd")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, major, minor
        tar.addfile(info)
    source = _layout(tmp_path / "oci", buf.getvalue())
    commands = [["squash", source, str(tmp_path / "out.sqfs")]]
    if max(major, minor) >= 2**21:  # past the canonical tar's 7 octal digits too
        commands.append(["export", source, "-o", str(tmp_path / "out.tar")])
    for command in commands:
        result = _cli(*command)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(err) == 1, (command, result.stderr[-2000:])
        assert err[0].startswith("squashstore: ") and "Traceback" not in result.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


# -- the fast paths: the same result as the general ones -----------------------------------

_FIELD_BYTES = st.sampled_from([b"0000644\x00", b" 644 \x00", b"0000000", b"\x80" + bytes(6)
                                + b"\x05", b"12x\x00", b"", b"\x00" * 8, b"7777777\x00",
                                b"01234567", b" \x00 12\x00"])


@settings(max_examples=400, deadline=None)
@given(name=st.binary(max_size=100), prefix=st.binary(max_size=155), link=st.binary(max_size=100),
       typeflag=st.sampled_from([b"0", b"5", b"2", b"1", b"3", b"x", b"\x00"]),
       numbers=st.lists(_FIELD_BYTES, min_size=7, max_size=7),
       magic=st.sampled_from(["ustar", "gnu", "v7"]), star=st.booleans(),
       checksum_delta=st.sampled_from([0, 0, 0, 1]))
def test_header_fast_path_reads_what_the_general_path_reads(
        name: bytes, prefix: bytes, link: bytes, typeflag: bytes, numbers: list[bytes],
        magic: str, star: bool, checksum_delta: int) -> None:
    """`parse_header`'s ustar fast path (one unpack, remembered numeric fields) returns the
    header, or raises the error, that the general path (Go's readHeader) does; twice, so
    the second read takes the remembered fields."""
    from squashstore.tar import reader as tr

    offsets = (100, 108, 116, 329, 337, 124, 136)
    block = bytearray(ts.header(name, typeflag, linkname=link, magic=magic, prefix=prefix))
    for offset, raw in zip(offsets, numbers, strict=True):
        block[offset:offset + 8] = raw.ljust(8, b"\x00")[:8]
    if star:
        block[508:512] = b"tar\x00"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % (sum(block) + checksum_delta)
    data = bytes(block)

    def outcome(parse: Callable[[bytes], object]) -> object:
        try:
            return repr(parse(data))
        except TarError as exc:
            return f"error {exc}"

    general = outcome(tr._parse_header_general)
    assert outcome(tr.parse_header) == general
    assert outcome(tr.parse_header) == general


@given(st.binary(min_size=512, max_size=512))
def test_block_sum_is_the_byte_sum(block: bytes) -> None:
    from squashstore.tar.format import block_sum

    assert block_sum(block) == sum(block)
    assert block_sum(b"\xff" * 512) == 255 * 512
