"""The README's demo: build an image, migrate it into a squash store, run it from there.

Everything happens in a throw-away directory with private podmans (tests/support/podman.py,
never the machine's own store): a three-layer image is built (a file added, one deleted, a
directory replaced), `squashstore migrate` squashes it into a fresh store, and a second
podman configured with `squashstore config`'s lines lists and runs it, mounting the squash
file on demand through squashstore-mount-program. Each command is printed before it runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.podman import make_podman  # noqa: E402

SQUASHSTORE = str(ROOT / ".venv" / "bin" / "squashstore")
MOUNT_PROGRAM = str(ROOT / ".venv" / "bin" / "squashstore-mount-program")


def show(argv: list[str], env: dict[str, str] | None = None) -> str:
    print(f"\n$ {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"demo: that command failed (exit {result.returncode})")
    return result.stdout


def base_tar(dest: Path) -> Path:
    """A root filesystem with busybox (so RUN steps and the container work)."""
    with tarfile.open(dest, "w") as tar:
        for name in ("bin", "etc", "app", "app/old"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add("/bin/busybox", "bin/busybox")
        for applet in ("sh", "ls", "cat", "rm", "mkdir", "echo", "find", "wc"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        for name, text in (("etc/motd", "hello from the base layer\n"),
                           ("app/old/data", "soon deleted\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    return dest


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="squashstore-demo-"))
    builder = consumer = None
    try:
        store = work / "store"
        builder = make_podman(work)
        print(f"demo: working in {work} (private podmans, private squash store)")
        builder.import_tar(base_tar(work / "base.tar"), "localhost/demo-base:1")
        ctx = work / "ctx"
        ctx.mkdir()
        (ctx / "greeting").write_text("hello from a squashed image\n")
        (ctx / "Containerfile").write_text(
            "FROM localhost/demo-base:1\n"
            "COPY greeting /app/greeting\n"
            "RUN rm -rf /app/old && mkdir /app/old && echo new > /app/old/data\n"
            "ENV DEMO=1\nWORKDIR /app\n"
            'CMD ["/bin/sh", "-c", "cat greeting; ls /app/old; echo DEMO=$DEMO in $(pwd)"]\n')
        show(["podman", "build", "-q", "--network", "none", "--pull=never", "-t",
              "localhost/demo:1", str(ctx)], env=builder.env)
        show(["podman", "images"], env=builder.env)
        show([SQUASHSTORE, "--store", str(store), "migrate", "localhost/demo:1"],
             env=builder.env)
        show([SQUASHSTORE, "--store", str(store), "images"], env=builder.env)
        show([SQUASHSTORE, "--store", str(store), "config"], env=builder.env)
        consumer = make_podman(work, additional_stores=[store], mount_program=MOUNT_PROGRAM)
        print("\ndemo: a second podman whose storage.conf has those lines:")
        show(["podman", "images"], env=consumer.env)
        show(["podman", "run", "--rm", "--pull=never", "localhost/demo:1"], env=consumer.env)
        show([SQUASHSTORE, "--store", str(store), "mounts"], env=builder.env)
        show([SQUASHSTORE, "--store", str(store), "umount", "--all"], env=builder.env)
        print("\ndemo: unmounted; the next container start mounts it again:")
        show(["podman", "run", "--rm", "--pull=never", "localhost/demo:1"], env=consumer.env)
        show([SQUASHSTORE, "--store", str(store), "verify"], env=builder.env)
        print("\ndemo: no container uses it now; cleanup (cron/timer) unmounts it:")
        time.sleep(6)  # cleanup never touches a mount younger than 5 s (one being set up)
        show([SQUASHSTORE, "--store", str(store), "cleanup", "--grace", "0"], env=builder.env)
        show([SQUASHSTORE, "--store", str(store), "mounts"], env=builder.env)
        print("\ndemo: done.")
    finally:
        for podman in (consumer, builder):
            if podman is not None:
                podman.close()
        subprocess.run([SQUASHSTORE, "--store", str(work / "store"), "umount", "--all"],
                       capture_output=True, env=dict(os.environ))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
