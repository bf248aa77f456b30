"""A hermetic real podman for tests: private config, storage and runtime directories.

`make_podman(base)` writes a private ``containers.conf``, ``storage.conf`` and
``registries.conf`` under a fresh directory in `base` (as ``/work/shared/notes/podman-here.md``
prescribes: runc, fixed ulimits, no network, private static_dir and tmp dirs, events to a
file) and returns a `Podman` whose `env` points podman at them, so the machine's default
store (``/var/lib/containers/storage``) is never touched (podman 4.3.1 as root still updates
its blob-info cache, /var/lib/containers/cache/blob-info-cache-v1.boltdb, and has no setting
to move it). The runroot is a short private dir in /tmp (see `RUNROOT_PARENT`: long runroot
paths make every ``podman run`` wait 20 s). A second "consumer" podman can list a
squash store in ``additionalimagestores`` and use a ``mount_program``. `Podman.close()`
removes every container, unmounts everything mounted below its root and runroot and
deletes both.
Every podman command that could pull gets ``--pull=never``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

PODMAN = "podman"


def _toml_str(value: str | Path) -> str:
    """`value` as a TOML basic string."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def containers_conf(root: Path) -> str:
    """The text of the private containers.conf for a podman rooted at `root`."""
    return f"""\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[network]
network_config_dir = {_toml_str(root / "net")}

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
tmp_dir = {_toml_str(root / "tmp")}
static_dir = {_toml_str(root / "root" / "libpod")}
volume_path = {_toml_str(root / "vol")}
events_logger = "file"
events_logfile_path = {_toml_str(root / "tmp" / "events.log")}
image_copy_tmp_dir = {_toml_str(root / "tmp")}
"""


def storage_conf(
    root: Path,
    additional_stores: Sequence[Path] = (),
    mount_program: str | None = None,
    runroot: Path | None = None,
) -> str:
    """The text of the private storage.conf for a podman rooted at `root` (runroot
    `runroot`, by default ``root/run``)."""
    stores = ", ".join(_toml_str(s) for s in additional_stores)
    text = f"""\
[storage]
driver = "overlay"
graphroot = {_toml_str(root / "root")}
runroot = {_toml_str(runroot or root / "run")}

[storage.options]
additionalimagestores = [{stores}]
"""
    if mount_program is not None:
        text += f"""
[storage.options.overlay]
mount_program = {_toml_str(mount_program)}
"""
    return text


REGISTRIES_CONF = """\
unqualified-search-registries = []
short-name-mode = "disabled"
"""


RUNROOT_PARENT = Path("/tmp")
"""Where runroots go. podman 4.3.1's ``run`` waits 20 s for every container ("Exceeded
conmon timeout waiting for container to exit") when the runroot path is longer than about
45 characters, as pytest's tmp_path dirs are; so the runroot is a short private dir here."""


def _short_runroot() -> Path:
    return Path(tempfile.mkdtemp(prefix="sqsrun-", dir=RUNROOT_PARENT))


class Podman:
    """A podman whose configuration and storage all live below `root`, except its runroot
    (a short private dir in /tmp, see `RUNROOT_PARENT`), which `close` removes too."""

    def __init__(
        self,
        root: Path,
        additional_stores: Sequence[Path] = (),
        mount_program: str | None = None,
        runroot: Path | None = None,
    ) -> None:
        self.root = root
        self.graphroot = root / "root"
        self.runroot = runroot if runroot is not None else _short_runroot()
        self.additional_stores = [Path(s) for s in additional_stores]
        self.mount_program = mount_program
        for sub in ("root", "tmp", "net", "vol", "etc"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.runroot.mkdir(parents=True, exist_ok=True)
        self.containers_conf = root / "etc" / "containers.conf"
        self.storage_conf = root / "etc" / "storage.conf"
        self.registries_conf = root / "etc" / "registries.conf"
        self.containers_conf.write_text(containers_conf(root))
        self.storage_conf.write_text(
            storage_conf(root, self.additional_stores, mount_program, self.runroot)
        )
        self.registries_conf.write_text(REGISTRIES_CONF)
        self.env: dict[str, str] = dict(os.environ)
        self.env["CONTAINERS_CONF"] = str(self.containers_conf)
        self.env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)
        self.env["CONTAINERS_REGISTRIES_CONF"] = str(self.registries_conf)
        self.env["TMPDIR"] = str(root / "tmp")
        self.closed = False

    def run(
        self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS`` in this podman's environment; on failure (with `check`) raise
        AssertionError carrying podman's stderr."""
        proc = subprocess.run(
            [PODMAN, *args],
            env=self.env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} failed with exit {proc.returncode}:\n"
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def text(self, *args: str, timeout: float = 300) -> str:
        """Stdout of ``podman ARGS`` (checked), decoded and stripped."""
        return self.run(*args, timeout=timeout).stdout.decode().strip()

    def build(self, context_dir: Path, tag: str, *extra: str) -> str:
        """``podman build`` `context_dir` (its Containerfile) as `tag`; the image id."""
        iidfile = Path(tempfile.mkstemp(dir=self.root / "tmp", prefix="iid-")[1])
        try:
            self.run(
                "build", "--network", "none", "--pull=never", "--layers",
                "--iidfile", str(iidfile), "-t", tag, *extra, str(context_dir),
                timeout=600,
            )
            return iidfile.read_text().strip().removeprefix("sha256:")
        finally:
            iidfile.unlink(missing_ok=True)

    def import_tar(self, tar: Path, tag: str, *changes: str) -> str:
        """``podman import`` a rootfs tar as a one-layer image `tag` (with ``--change``
        instructions `changes`); the image id."""
        args = ["import"]
        for change in changes:
            args += ["--change", change]
        out = self.text(*args, str(tar), tag)
        return out.splitlines()[-1].removeprefix("sha256:")

    def create(self, image: str) -> str:
        """``podman create`` a container of `image` (never started); its id."""
        proc = self.run("create", "--pull=never", image, check=False)
        if proc.returncode != 0 and b"no command or entrypoint" in proc.stderr:
            proc = self.run("create", "--pull=never", image, "/nonexistent-command")
        elif proc.returncode != 0:
            raise AssertionError(
                f"podman create {image} failed: {proc.stderr.decode(errors='replace')}"
            )
        return proc.stdout.decode().strip().splitlines()[-1]

    def export(self, image: str, dest: Path) -> Path:
        """The merged root filesystem of `image` as podman sees it: ``podman export`` of a
        fresh container into the tar `dest` (the container is removed again)."""
        cid = self.create(image)
        try:
            self.run("export", "-o", str(dest), cid)
        finally:
            self.run("rm", "-f", cid, check=False)
        return dest

    def save(self, image: str, dest: Path, fmt: str = "oci-archive", *extra: str) -> Path:
        """``podman save --format FMT`` of `image` to `dest` (a tar, or a directory for
        ``oci-dir``/``docker-dir``); `dest`. Pass ``"--uncompressed"`` in `extra` for plain
        tar layer blobs in a directory format."""
        self.run("save", "--format", fmt, *extra, "-o", str(dest), image, timeout=600)
        return dest

    def load(self, archive: Path) -> None:
        """``podman load`` an archive written by `save`."""
        self.run("load", "-i", str(archive), timeout=600)

    @contextlib.contextmanager
    def mount_image(self, image: str) -> Iterator[Path]:
        """``podman image mount`` `image` (read-only overlay of its layers) for the block."""
        path = Path(self.text("image", "mount", image))
        try:
            yield path
        finally:
            self.run("image", "unmount", image, check=False)

    def inspect(self, image: str) -> dict[str, object]:
        """``podman image inspect`` of `image` (the first element)."""
        data = json.loads(self.text("image", "inspect", image))
        assert isinstance(data, list) and data, data
        result = data[0]
        assert isinstance(result, dict)
        return result

    def layers(self, image: str) -> list[str]:
        """The diff ids (``RootFS.Layers``) of `image`, bottom first."""
        rootfs = self.inspect(image)["RootFS"]
        assert isinstance(rootfs, dict)
        return list(rootfs["Layers"])

    def mounts_below_root(self) -> list[str]:
        """Mount points below `root` or `runroot`, deepest first (/proc/self/mountinfo)."""
        return sorted(
            set(mounts_below(self.root)) | set(mounts_below(self.runroot)),
            key=lambda p: (-p.count("/"), p),
        )

    def close(self) -> None:
        """Remove all containers, unmount everything below `root` and delete `root`."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.run("rm", "-af", "-t", "0", check=False, timeout=120)
        with contextlib.suppress(Exception):
            self.run("image", "unmount", "-a", "-f", check=False, timeout=60)
        for mount_point in self.mounts_below_root():
            subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
        left = self.mounts_below_root()
        if left:
            # Never let rmtree walk into something still mounted (it could be a bind mount).
            raise AssertionError(f"still mounted below {self.root} after cleanup: {left}")
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unescape_mountinfo(field: str) -> str:
    """Undo the octal escapes (``\\040``) of a /proc/self/mountinfo path field."""
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit() and len(raw[i + 1 : i + 4]) == 3:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    prefix = str(root.resolve())
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def make_podman(
    base: Path, additional_stores: Sequence[Path] = (), mount_program: str | None = None
) -> Podman:
    """A new `Podman` in a fresh directory below `base`; the caller must `close()` it."""
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="podman-", dir=base))
    return Podman(root, additional_stores, mount_program)
