"""The OCI poststop hook's cost: what `squashstore hook poststop` imports.

podman runs the hook at every container stop and `podman run --rm` waits for it, so its
imports are stop time (NOTES.md, "Poststop hook cost (branch hook)"). The behaviour of the
hook against a real podman is tests/test_cleanup.py's and tests/test_rootless.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cleanup import A, _wait_until, base_image, setup_store  # noqa: F401 (a fixture)
from test_store import SqLayer

from squashstore import hook, launcher, storelayout
from squashstore.cli import main
from squashstore.image import Image
from squashstore.mountrecords import MountRecord, RecordRegistry
from support.fixture_trees import write_base_tar

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
    assert {"squashstore.cli.hook", "squashstore.cleanup"} <= imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


# --------------------------------------------------------------------------- branch hookfast

def test_the_old_hook_command_lines_skip_the_parser_too() -> None:
    """`config --hooks` printed ``squashstore --store S hook poststop`` before the hook had
    its own program: hooks.d files written then keep working, without the parser."""
    for argv in (["--store", "/s", "hook", "poststop"], ["--store=/s", "hook", "poststop"]):
        assert vars(main.hook_args(argv) or {}) == vars(main.build_parser(argv).parse_args(argv))
    for argv in (["--store", "--debug", "hook", "poststop"], ["--store", "/s", "hook"],
                 ["--store", "/s", "--debug", "hook", "poststop"]):
        assert main.hook_args(argv) is None


def test_config_hooks_names_the_hook_launcher() -> None:
    """scripts/install writes the hook's launcher; `config --hooks` names it (a pip console
    script there would start with site and the editable finder)."""
    out = subprocess.run([str(SQUASHSTORE), "config", "--hooks"], capture_output=True,
                         text=True, check=True).stdout
    hook = json.loads(out)
    program = str(REPO / ".venv" / "bin" / launcher.HOOK)
    assert hook == {"version": "1.0.0", "hook": {"path": program, "args": [program, "poststop"]},
                    "when": {"always": True}, "stages": ["poststop"]}
    assert launcher.is_launcher(program, launcher.HOOK)
    assert Path(program).read_text().startswith(f"#!{sys.executable} -IS\n") or \
        Path(program).read_text().startswith("#!" + str(REPO / ".venv" / "bin" / "python"))
    assert not launcher.is_launcher(str(SQUASHSTORE), launcher.HOOK)
    assert not launcher.is_launcher(program, launcher.NAME)


def _unknown_state(tmp_path: Path) -> str:
    return json.dumps({"id": "f" * 64, "bundle": str(tmp_path / "g" / "overlay-containers"
                                                     / ("f" * 64) / "userdata")})


def test_the_inline_hook_command_runs_the_same_program(tmp_path: Path) -> None:
    """An install without the launcher file gets ``python -I -S -c`` with the launcher's
    text (`launcher.command`): it ignores PYTHONPATH and the working directory, and answers
    as the launcher does."""
    argv = [sys.executable, "-I", "-S", "-c",
            launcher.source(launcher.search_path(), launcher.HOOK), "poststop"]
    planted = tmp_path / "squashstore"
    planted.mkdir()
    (planted / "__init__.py").write_text("raise SystemExit('planted package imported')\n")
    env = {"PYTHONPATH": str(tmp_path)}
    for command in (argv, [str(REPO / ".venv" / "bin" / launcher.HOOK), "poststop"]):
        ok = subprocess.run(command, input=_unknown_state(tmp_path), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
        bad = subprocess.run(command, input="{", env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
        assert bad.stderr.startswith("squashstore: hook: not an OCI container state"), bad
        usage = subprocess.run(command[:-1], env=env, capture_output=True, text=True,
                               timeout=60)
        assert usage.returncode == 2 and usage.stderr.startswith("usage: squashstore-hook")


def _write_podman_files(graphroot: Path, layers: list[dict[str, str]],
                        containers: list[dict[str, str]]) -> None:
    (graphroot / "overlay-layers").mkdir(parents=True, exist_ok=True)
    (graphroot / "overlay-containers").mkdir(exist_ok=True)
    (graphroot / "overlay-layers" / "layers.json").write_text(json.dumps(layers))
    (graphroot / "overlay-containers" / "containers.json").write_text(json.dumps(containers))


def test_stopping_layers_are_local_only_on_proof(tmp_path: Path) -> None:
    """The fast exit needs every layer below the container in its own store's layers.json:
    a layer of another store, a chain too long to follow, a damaged layers.json, or (as
    root) one another user owns leave the hook on its full path."""
    graphroot, cid = tmp_path / "g", "c" * 64
    container = hook.StoppingContainer(cid, str(graphroot))
    own = [{"id": "top", "parent": "base"}, {"id": "base"}]
    _write_podman_files(graphroot, own, [{"id": cid, "layer": "top"}])
    assert hook.stopping_layers(container) == hook.StoppingLayers(
        "top", frozenset({"top", "base"}), True)
    _write_podman_files(graphroot, [{"id": "top", "parent": "store-layer"}],
                        [{"id": cid, "layer": "top"}])
    found = hook.stopping_layers(container)
    assert (found.below, found.local, found.may_use_a_store()) == (
        frozenset({"top", "store-layer"}), False, True)
    chain = [{"id": f"l{i}", "parent": f"l{i + 1}"} for i in range(2000)] + [{"id": "l2000"}]
    _write_podman_files(graphroot, chain, [{"id": cid, "layer": "l0"}])
    assert not hook.stopping_layers(container).local
    _write_podman_files(graphroot, own, [{"id": cid, "layer": "top"}])
    (graphroot / "overlay-layers" / "layers.json").write_text("[{")
    assert hook.stopping_layers(container) == hook.StoppingLayers("top", frozenset({"top"}))
    _write_podman_files(graphroot, own, [{"id": cid, "layer": "top"}])
    os.chown(graphroot / "overlay-layers" / "layers.json", 65534, 65534)
    assert not hook.stopping_layers(container).local, "another user's layers.json is no proof"
    os.chown(graphroot / "overlay-containers" / "containers.json", 65534, 65534)
    assert hook.stopping_layers(container) == hook.StoppingLayers()
    _write_podman_files(graphroot, own, [{"id": cid, "layer": "top"}])
    marker = Path(storelayout.format_path(graphroot))
    marker.parent.mkdir()
    marker.write_text("1\n")
    assert storelayout.is_store(graphroot)
    assert not hook.stopping_layers(container).local, "a squash store as graphroot"
    unknown = hook.StoppingContainer("d" * 64, str(graphroot))
    assert not hook.stopping_layers(unknown).may_use_a_store()
    assert hook.graphroot_of_bundle("/a//b/./overlay-containers/x/userdata/") == "/a/b"
    assert hook.graphroot_of_bundle("/a/b/x/userdata") == ""


@pytest.mark.parametrize("plant", ["containers.json is a FIFO",
                                   "layers.json is a symlink to a FIFO"])
def test_the_hook_never_waits_on_a_planted_file(tmp_path: Path, plant: str) -> None:
    """A FIFO or a symlink where podman keeps a record file: the hook (root, at every stop,
    while podman waits for it) refuses it at once; it opened and waited forever before."""
    graphroot, cid = tmp_path / "g", "c" * 64
    _write_podman_files(graphroot, [{"id": "top"}], [{"id": cid, "layer": "top"}])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if plant.startswith("containers"):
        target = graphroot / "overlay-containers" / "containers.json"
        target.unlink()
        os.mkfifo(target)
    else:
        target = graphroot / "overlay-layers" / "layers.json"
        target.unlink()
        target.symlink_to(fifo)
    state = json.dumps({"id": cid, "bundle": str(graphroot / "overlay-containers" / cid
                                                 / "userdata")})
    env = {"SQUASHSTORE_RUNTIME_DIR": str(tmp_path / "run"),
           "SQUASHSTORE_CONFIG": str(tmp_path / "none.toml")}
    proc = subprocess.run([str(REPO / ".venv" / "bin" / launcher.HOOK), "poststop"],
                          input=state, env=env, capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def _traced_hook(hooks_dir: Path, log: Path) -> None:
    """The installed hook's JSON, its command run under ``strace`` (which files it opens)."""
    path = hooks_dir / "squashstore.json"
    config = json.loads(path.read_text())
    inner = config["hook"]
    inner["args"] = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log),
                     inner["path"], *inner["args"][1:]]
    inner["path"] = shutil.which("strace")
    path.write_text(json.dumps(config))


def _modules_opened(log: Path) -> set[str]:
    """squashstore's modules whose source or bytecode the traced hook opened."""
    found = set()
    for name in re.findall(r'"[^"]*/squashstore/(?:__pycache__/)?([a-z_]+)[.](?:py|cpython)',
                           log.read_text()):
        found.add(name)
    return found


def test_the_hook_as_podman_runs_it_ends_early_for_a_container_without_a_store(
        tmp_path: Path, base_image: tuple[Image, SqLayer]) -> None:  # noqa: F811 (fixture)
    """podman runs the installed hook (config --hooks, hooks_dir) at every stop: for a
    container of podman's own store it reads podman's files and ends, importing none of the
    cleanup; for a store image's container it goes on and unmounts the mount."""
    with setup_store(tmp_path, base_image, hooks=True) as s:
        log = tmp_path / "hook.trace"
        _traced_hook(tmp_path / "hooks.d", log)
        s.consumer.import_tar(write_base_tar(tmp_path / "own.tar"), "localhost/own:1",
                              "ENV PATH=/bin")
        assert s.podman("run", "--rm", "--pull=never", "localhost/own:1", "cat",
                        "/etc/config") == "base config"
        opened = _modules_opened(log)
        assert "hook" in opened, opened
        assert not opened & {"cleanup", "tracker", "config", "mountrecords", "mounts",
                             "store", "cli"}, sorted(opened)
        log.unlink()
        assert s.podman("run", "--rm", "--pull=never", A, "cat", "/etc/config") == \
            "base config"
        _wait_until(lambda: s.mounted() == set())
        assert {"hook", "cleanup", "tracker"} <= _modules_opened(log)
