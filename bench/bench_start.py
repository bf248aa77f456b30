"""Container start from a squash store against a start from podman's own store.

`podman run --rm IMG true` is timed, in one run and interleaved round by round (the machine
is shared: medians of many rounds), for: the image in podman's own store (the peer); the
same image in a squash store with the layer already mounted (the mount program's fast path);
and with the layer unmounted before each start (the mount program mounts it). The mount
itself is timed on its own (`Mounter.mount`, in this process) so the first start can be
compared with "mounted start + mount". Each backend of `--backend` (default: fuse, the
project's own server, and kernel) gets its own store and consumer podman.

Two peers split the gap: podman's own store with a *shell* mount program (``exec mount -t
overlay overlay "$@"``: what podman itself pays for any mount program: the exec'd program
and mount(8), and ``fusermount3 -u`` at cleanup) and the squash store with that shell
program while the image is mounted (adds reading the additional store and a squash lower).
Our mount program's own cost is the difference to "image mounted". Such a program cannot
mount the layer, so it is timed only while the image is mounted; an unmounted start with
it has an empty root file system (podman exit 127: "true" not found). `--program` takes
full mount programs (e.g. an older checkout's, through a wrapper), timed like ours.

The squashstore package is byte-compiled first (a mount program compiling its modules at
every start, as it does under PYTHONDONTWRITEBYTECODE with no ``__pycache__``, costs ~90 M
instructions more). `--nice` runs the timed commands at nice -20 (root): on a machine the
other engineers load, their CPU share then barely stretches the starts.
`--direct N` then times the mount program alone, N interleaved runs per program while the
image is mounted (its fast path), with podman's call as it makes it but ``mount`` and
``fuse-overlayfs`` found first on PATH as stubs that do nothing (so no overlay is mounted):
the per-start cost of the program itself, without podman's noise. The shell program is its
floor (one exec of sh plus the stub).

`--hook` times the OCI poststop hook as a user pays it instead: installed as docs/cleanup.md
says (`config --hooks`'s JSON in a hooks directory named by ``hooks_dir`` in the podman's
containers.conf, with the private registry and config in its ``env``), every `podman run
--rm` stop runs it and waits for it. Interleaved rounds of: the image in podman's own store
without and with the hook (a container that uses no squash store); the store image, mounted,
without the hook; with the hook while another container holds the mount (the hook reads,
decides and keeps it: its steady cost); and with the hook and nothing else holding it (each
stop unmounts, so each run is a first start). Then the instructions of the hook command
alone (``valgrind --tool=callgrind``, podman's empty environment plus the JSON's ``env``) for
a stopping container of each store. `--hook-from LABEL=SQUASHSTORE` adds the hook another
install's ``config --hooks`` prints (e.g. an older checkout's), timed the same way.
Run: .venv/bin/python bench/bench_start.py [--rounds N] [--backend fuse,kernel] [--nice]
[--direct N] [--hook [--hook-from LABEL=SQUASHSTORE]]
"""

from __future__ import annotations

import compileall
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import ROOT, arguments, print_table

if TYPE_CHECKING:
    from squashstore.mounts import Registry
    from support.podman import Podman

SQUASHSTORE = str(ROOT / ".venv/bin/squashstore")
MOUNT_PROGRAM = str(ROOT / ".venv/bin/squashstore-mount-program")
IMAGE = "localhost/bench-start:1"
COMMAND = ("run", "--rm", "--pull=never", "--network", "none", IMAGE, "true")
SHELL_PROGRAM = '#!/bin/sh\nexec mount -t overlay overlay "$@"\n'
"""A mount program that only mounts the overlay (podman's own store needs nothing else)."""


def run_seconds(env: dict[str, str], argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, check=False, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return took


def main() -> int:
    parser = arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="fuse,kernel")
    parser.add_argument("--program", action="append", default=[], metavar="LABEL=PATH",
                        help="another mount program to time in the same run (e.g. an older "
                        "checkout's, through a wrapper)")
    parser.add_argument("--nice", action="store_true",
                        help="time at nice -20 (root), against the machine's other load")
    parser.add_argument("--direct", type=int, default=0, metavar="N",
                        help="then time each mount program alone N times (image mounted)")
    parser.add_argument("--hook", action="store_true",
                        help="time the poststop hook as a user pays it (see the docstring)")
    parser.add_argument("--hook-from", action="append", default=[], metavar="LABEL=SQUASHSTORE",
                        help="also the hook another install's `config --hooks` prints")
    args = parser.parse_args()
    if args.hook:
        if args.nice:
            os.nice(-20)
        compileall.compile_dir(ROOT / "squashstore", quiet=1)
        return hook_bench(args.rounds, [b for b in args.backend.split(",") if b],
                          {"": SQUASHSTORE} | dict(h.split("=", 1) for h in args.hook_from))
    programs = {"": MOUNT_PROGRAM} | dict(p.split("=", 1) for p in args.program)
    if args.nice:
        os.nice(-20)
    compileall.compile_dir(ROOT / "squashstore", quiet=1)
    backends = [(b, label) for b in args.backend.split(",") if b for label in programs]

    from squashstore import host
    from squashstore.mounts import Registry, mounter
    from support.fixture_trees import write_base_tar
    from support.podman import make_podman

    work = Path(tempfile.mkdtemp(prefix="sqs-bench-start-"))
    podmen = []
    setups: dict[str, tuple[dict[str, str], Registry]] = {}
    try:
        producer = make_podman(work / "producer")
        podmen.append(producer)
        base_tar = write_base_tar(work / "base.tar")
        producer.import_tar(base_tar, IMAGE, "ENV PATH=/bin")
        shell = work / "shell-mount-program"
        shell.write_text(SHELL_PROGRAM)
        shell.chmod(0o755)
        own_shell = make_podman(work / "own-shell", [], str(shell))
        podmen.append(own_shell)
        own_shell.import_tar(base_tar, IMAGE, "ENV PATH=/bin")
        shell_envs: dict[str, dict[str, str]] = {}
        for backend, label in backends:
            name = f"{backend}{' ' + label if label else ''}"
            run_dir = work / f"run-{backend}{label}"
            config = work / f"config-{backend}.toml"
            config.write_text(f'[mount]\nbackend = "{backend}"\n')
            extra = {"SQUASHSTORE_RUNTIME_DIR": str(run_dir), "SQUASHSTORE_CONFIG": str(config)}
            store = work / f"store-{backend}{label}"
            subprocess.run([SQUASHSTORE, "--store", str(store), "migrate", IMAGE, "--no-mount"],
                           env={**producer.env, **extra}, check=True, capture_output=True)
            consumer = make_podman(work / f"consumer-{backend}{label}", [store],
                                   programs[label])
            podmen.append(consumer)
            env = {**consumer.env, **extra}  # podman passes its environment to the program
            os.environ.update(extra)
            registry = Registry(run_dir)
            setups[name] = (env, registry)
            if backend not in shell_envs:
                shelled = make_podman(work / f"consumer-{backend}-shell", [store], str(shell))
                podmen.append(shelled)
                shell_envs[backend] = {**shelled.env, **extra}

        times: dict[str, list[float]] = {"podman": [], "podman shell": []}
        for _ in range(2):  # warm-up: page cache, podman's own first-run work
            run_seconds(producer.env, ["podman", *COMMAND])
            run_seconds(own_shell.env, ["podman", *COMMAND])
            for env, _registry in setups.values():
                run_seconds(env, ["podman", *COMMAND])
            for env in shell_envs.values():
                run_seconds(env, ["podman", *COMMAND])
        for _ in range(args.rounds):
            times["podman"].append(run_seconds(producer.env, ["podman", *COMMAND]))
            times["podman shell"].append(run_seconds(own_shell.env, ["podman", *COMMAND]))
            for backend, (env, registry) in setups.items():
                times.setdefault(f"{backend} mounted", []).append(
                    run_seconds(env, ["podman", *COMMAND]))
                shelled_env = shell_envs.get(backend)
                if shelled_env is not None:  # the layer is mounted now (the start above)
                    times.setdefault(f"{backend} shell", []).append(
                        run_seconds(shelled_env, ["podman", *COMMAND]))
                registry.umount_all(lazy=True)
                times.setdefault(f"{backend} unmounted", []).append(
                    run_seconds(env, ["podman", *COMMAND]))
                record = registry.records()
                if not record:
                    raise SystemExit(f"{backend}: the start left no mount record")
                squash, point = Path(record[0].squash), Path(record[0].mountpoint)
                registry.umount_all(lazy=True)
                chosen = mounter(backend.split()[0])
                start = time.perf_counter()
                chosen.mount(squash, point)
                times.setdefault(f"{backend} mount itself", []).append(
                    time.perf_counter() - start)
                chosen.umount(point, lazy=True)
                while host.is_mountpoint(point):
                    time.sleep(0.01)
                run_seconds(env, ["podman", *COMMAND])  # mounted again for the next round

        base = statistics.median(times["podman"])
        own_shell_time = statistics.median(times["podman shell"])
        rows = [["podman's own store", f"{base:.3f}", "1.00", ""],
                ["podman's own store, shell mount program", f"{own_shell_time:.3f}",
                 f"{own_shell_time / base:.2f}", ""]]
        for backend in setups:
            if f"{backend} shell" in times:
                shelled = statistics.median(times[f"{backend} shell"])
                rows.append([f"store ({backend}), image mounted, shell mount program",
                             f"{shelled:.3f}", f"{shelled / base:.2f}", ""])
            mounted = statistics.median(times[f"{backend} mounted"])
            cold = statistics.median(times[f"{backend} unmounted"])
            mount = statistics.median(times[f"{backend} mount itself"])
            rows.append([f"store ({backend}), image mounted", f"{mounted:.3f}",
                         f"{mounted / base:.2f}", ""])
            rows.append([f"store ({backend}), image unmounted", f"{cold:.3f}",
                         f"{cold / base:.2f}",
                         f"{cold - mounted - mount:+.3f} s vs mounted + mount "
                         f"({mount:.3f} s)"])
        print_table(f"podman run --rm IMG true: medians of {args.rounds} interleaved rounds "
                    f"(load average {os.getloadavg()[0]:.1f})",
                    ["start", "median s", "ratio", "first start overhead"], rows)
        if args.direct:
            direct(work, setups, programs, shell, args.direct)
    finally:
        for _env, registry in setups.values():
            registry.umount_all(lazy=True)
        for podman in podmen:
            podman.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def direct(work: Path, setups: dict[str, tuple[dict[str, str], Registry]],
           programs: dict[str, str], shell: Path, runs: int) -> None:
    """Time each mount program alone on its mounted layer (see the module docstring)."""
    stubs = work / "stub-bin"
    stubs.mkdir(exist_ok=True)
    for name in ("mount", "fuse-overlayfs"):
        if not (stubs / name).exists():
            (stubs / name).symlink_to(shutil.which("true") or "/bin/true")
    calls: dict[str, tuple[list[str], dict[str, str]]] = {}
    for name, (env, registry) in setups.items():
        label = name.partition(" ")[2]
        [record] = registry.records()
        layer_dir = Path(record.mountpoint).parent
        link = layer_dir.parent / "l" / (layer_dir / "link").read_text().strip()
        merged = work / f"direct-{name.replace(' ', '-')}"
        option = f"lowerdir={link},upperdir={merged}.up,workdir={merged}.work"
        run_env = {**env, "PATH": f"{stubs}:{env.get('PATH', os.defpath)}"}
        calls[name] = ([programs[label], "-o", option, str(merged)], run_env)
        if label == "" and "shell" not in calls:
            calls["shell"] = ([str(shell), "-o", option, str(merged)], run_env)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(3):
        for argv, env in calls.values():
            run_seconds(env, argv)
    for _ in range(runs):
        for name, (argv, env) in calls.items():
            times[name].append(run_seconds(env, argv))
    rows = [[name, f"{statistics.median(t) * 1000:.1f}",
             f"{sorted(t)[len(t) // 4] * 1000:.1f}"] for name, t in times.items()]
    print_table(f"the mount program alone, image mounted: {runs} interleaved runs (load "
                f"average {os.getloadavg()[0]:.1f})", ["program", "median ms", "p25 ms"], rows)


def hook_json(squashstore: str, store: Path, env: dict[str, str]) -> dict[str, object]:
    """`squashstore config --hooks` of an install, with the registry and config of `env` in
    the hook's ``env`` (podman runs hooks with an empty environment), as the tests do."""
    # Its own bin directory first on PATH: an older `config --hooks` names the first
    # `squashstore` on PATH.
    path = f"{Path(squashstore).parent}:{env.get('PATH', os.defpath)}"
    out = subprocess.run([squashstore, "--store", str(store), "config", "--hooks"],
                         env={**env, "PATH": path}, check=True, capture_output=True,
                         text=True).stdout
    hook: dict[str, object] = json.loads(out)
    inner = hook["hook"]
    assert isinstance(inner, dict)
    inner["env"] = [f"{k}={env[k]}" for k in ("SQUASHSTORE_RUNTIME_DIR", "SQUASHSTORE_CONFIG")]
    return hook


def hooked_env(podman: Podman, env: dict[str, str], hook: dict[str, object], name: str
               ) -> dict[str, str]:
    """`env` (`podman`'s) with a containers.conf whose ``hooks_dir`` holds `hook`."""
    hooks_dir = podman.root / f"hooks-{name}"
    hooks_dir.mkdir()
    (hooks_dir / "squashstore.json").write_text(json.dumps(hook))
    conf = podman.root / "etc" / f"containers-{name}.conf"
    conf.write_text(podman.containers_conf.read_text() + f'hooks_dir = ["{hooks_dir}"]\n')
    return {**env, "CONTAINERS_CONF": str(conf)}


def hook_instructions(hook: dict[str, object], state: dict[str, str]) -> int:
    """Instructions of one run of the hook command, as podman runs it (callgrind; every
    process it execs counted)."""
    inner = hook["hook"]
    assert isinstance(inner, dict)
    env = dict(e.split("=", 1) for e in inner.get("env", []))
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=yes",
                           "--callgrind-out-file=/dev/null", inner["path"], *inner["args"][1:]],
                          input=json.dumps(state), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hook failed under callgrind: {proc.stderr[-2000:]}")
    return sum(int(n.replace(",", ""))
               for n in re.findall(r"Collected : ([\d,]+)", proc.stderr))


def hook_bench(rounds: int, backends: list[str], installs: dict[str, str]) -> int:
    """The `--hook` runs (see the module docstring)."""
    from squashstore.mounts import Registry
    from support.fixture_trees import write_base_tar
    from support.podman import make_podman

    work = Path(tempfile.mkdtemp(prefix="sqs-bench-hook-"))
    podmen: list[Podman] = []
    registries: list[Registry] = []
    holders: list[tuple[dict[str, str], str]] = []
    cases: dict[str, dict[str, str]] = {}
    states: dict[str, dict[str, str]] = {}
    hooks: dict[str, dict[str, dict[str, object]]] = {label: {} for label in installs}
    try:
        producer = make_podman(work / "producer")
        podmen.append(producer)
        base_tar = write_base_tar(work / "base.tar")
        producer.import_tar(base_tar, IMAGE, "ENV PATH=/bin")
        first_env: dict[str, str] = {}
        for backend in backends:
            config = work / f"config-{backend}.toml"
            config.write_text(f'[mount]\nbackend = "{backend}"\n')
            for kind in ("plain", "held", "cycle"):
                run_dir = work / f"run-{backend}-{kind}"
                extra = {"SQUASHSTORE_RUNTIME_DIR": str(run_dir),
                         "SQUASHSTORE_CONFIG": str(config)}
                store = work / f"store-{backend}-{kind}"
                subprocess.run([SQUASHSTORE, "--store", str(store), "migrate", IMAGE,
                                "--no-mount"], env={**producer.env, **extra}, check=True,
                               capture_output=True)
                consumer = make_podman(work / f"consumer-{backend}-{kind}", [store],
                                       MOUNT_PROGRAM)
                podmen.append(consumer)
                registries.append(Registry(run_dir))
                env = {**consumer.env, **extra}
                first_env = first_env or env
                if kind == "plain":
                    cases[f"store ({backend}), mounted, no hook"] = env
                    continue
                for label, squashstore in installs.items():
                    hook = hook_json(squashstore, store, env)
                    hooks[label][f"{backend}-{kind}"] = hook
                    what = ("another container holds the mount" if kind == "held" else
                            "each stop unmounts")
                    name = f"store ({backend}), hook{' ' + label if label else ''}, {what}"
                    cases[name] = hooked_env(consumer, env, hook, f"{label}-{kind}")
                if kind == "held":
                    holder = subprocess.run(
                        ["podman", "run", "-d", "--pull=never", "--network", "none", IMAGE,
                         "sleep", "100000"], env=env, check=True, capture_output=True,
                        text=True).stdout.strip()
                    holders.append((env, holder))
                    other = subprocess.run(
                        ["podman", "run", "-d", "--pull=never", "--network", "none", IMAGE,
                         "sleep", "100000"], env=env, check=True, capture_output=True,
                        text=True).stdout.strip()
                    holders.append((env, other))
                    states[f"store ({backend}), another container holds the mount"] = {
                        "ociVersion": "1.0.2", "id": other, "status": "stopped",
                        "bundle": str(consumer.graphroot / "overlay-containers" / other
                                      / "userdata")}
        own_cases = {"own store, no hook": producer.env}
        for label, squashstore in installs.items():
            hooks[label]["own"] = hook_json(squashstore, work / "store-own", first_env)
            own_cases[f"own store, hook{' ' + label if label else ''}"] = hooked_env(
                producer, producer.env, hooks[label]["own"], f"own-{label}")
        cases = own_cases | cases
        own = subprocess.run(["podman", "create", "--pull=never", "--network", "none", IMAGE,
                              "true"], env=producer.env, check=True, capture_output=True,
                             text=True).stdout.strip()
        states["own store (no squash layer)"] = {
            "ociVersion": "1.0.2", "id": own, "status": "stopped",
            "bundle": str(producer.graphroot / "overlay-containers" / own / "userdata")}

        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(2):
            for env in cases.values():
                run_seconds(env, ["podman", *COMMAND])
        for _ in range(rounds):
            for name, env in cases.items():
                times[name].append(run_seconds(env, ["podman", *COMMAND]))
        base = statistics.median(times["own store, no hook"])
        rows = [[name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / base:.2f}",
                 f"{sorted(t)[len(t) // 4]:.3f}"] for name, t in times.items()]
        print_table(f"podman run --rm IMG true with the poststop hook: medians of {rounds} "
                    f"interleaved rounds (load average {os.getloadavg()[0]:.1f})",
                    ["start", "median s", "ratio", "p25 s"], rows)
        rows = []
        for label in installs:
            for what, state in states.items():
                key = ("own" if what.startswith("own") else
                       f"{what.split('(')[1].split(')')[0]}-held")
                count = hook_instructions(hooks[label][key], state)
                rows.append([f"{label or 'this checkout'}: {what}", f"{count / 1e6:.1f}"])
        print_table("the hook command alone (callgrind, podman's environment)",
                    ["stopping container", "M instructions"], rows)
    finally:
        for env, cid in holders:
            subprocess.run(["podman", "rm", "-f", "-t", "0", cid], env=env,
                           capture_output=True, check=False)
        for registry in registries:
            registry.umount_all(lazy=True)
        for podman in podmen:
            podman.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
