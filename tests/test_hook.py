"""The OCI poststop hook's cost: what `squashstore hook poststop` imports.

podman runs the hook at every container stop and `podman run --rm` waits for it, so its
imports are stop time (NOTES.md, "Poststop hook cost (branch hook)"). The behaviour of the
hook against a real podman is tests/test_cleanup.py's and tests/test_rootless.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from squashstore.cli import main
from squashstore.mountrecords import MountRecord, RecordRegistry

REPO = Path(__file__).resolve().parent.parent
SQUASHSTORE = REPO / ".venv" / "bin" / "squashstore"

HEAVY = ("squashstore.store", "squashstore.mounts", "squashstore.slurm", "squashstore.userns",
         "squashstore.image", "squashstore.cli.cleanup", "typing", "shutil", "subprocess",
         "hashlib", "traceback", "signal")
"""Modules the hook must not import when it unmounts nothing: together they were a third of
its instructions (the store module alone ~60 M; callgrind)."""


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_the_hook_command_line_skips_the_parser_but_parses_the_same() -> None:
    argv = ["hook", "poststop"]
    assert vars(main.hook_args(argv) or {}) == vars(main.build_parser(argv).parse_args(argv))
    assert main.hook_args(["--debug", "hook", "poststop"]) is None
    assert main.hook_args(["hook"]) is None


def test_poststop_forgets_a_gone_mount_without_heavy_imports(tmp_path: Path) -> None:
    """A stopping container over a store layer whose mount is gone: the hook (the installed
    console script, as podman runs it) observes, decides and forgets the record, importing
    none of `HEAVY`."""
    graphroot, store_layer, own_layer, cid = tmp_path / "graph", "l" * 64, "c" * 64, "f" * 64
    (graphroot / "overlay-layers").mkdir(parents=True)
    (graphroot / "overlay-containers").mkdir()
    (graphroot / "overlay-layers" / "layers.json").write_text(json.dumps(
        [{"id": own_layer, "parent": store_layer}]))
    (graphroot / "overlay-containers" / "containers.json").write_text(json.dumps(
        [{"id": cid, "names": ["x"], "layer": own_layer, "image": "i" * 64}]))
    run_dir = tmp_path / "run"
    registry = RecordRegistry(run_dir)
    mountpoint = tmp_path / "store" / "overlay" / store_layer / "diff"
    mountpoint.mkdir(parents=True)
    with registry.locked():
        registry.write(MountRecord("i" * 64, store_layer, "/s.sqfs", str(mountpoint), "kernel",
                                   None, 0.0))
    state = {"ociVersion": "1.0.2", "id": cid, "status": "stopped",
             "bundle": str(graphroot / "overlay-containers" / cid / "userdata")}
    env = {"SQUASHSTORE_RUNTIME_DIR": str(run_dir), "PYTHONPROFILEIMPORTTIME": "1",
           "SQUASHSTORE_CONFIG": str(tmp_path / "none.toml"), "PATH": os.environ["PATH"]}
    proc = subprocess.run([str(SQUASHSTORE), "hook", "poststop"], input=json.dumps(state),
                          env=env, capture_output=True, text=True, check=True)
    assert proc.stdout == f"forgot {mountpoint} image {'i' * 12}: mount gone\n"
    assert registry.records() == []
    imported = _imported(proc.stderr)
    assert {"squashstore.cli.hook", "squashstore.cleanup", "json"} <= imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
