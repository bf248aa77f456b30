"""A real 3-node Slurm cluster on this one machine, for tests and benches.

`Cluster` starts a private ``munged`` (its own key and socket), ``slurmctld`` and one
``slurmd`` per node (``n1``..``n3``), each slurmd in its own mount and UTS namespace
(``unshare -m -u --propagation private``) with its own hostname and a tmpfs on ``/run``, so
each node has its own runtime state (podman's runroot, squashstore's mount registry) and mounts,
as separate hosts would (see /work/shared/notes/slurm-here.md). Each node also gets its own
``/etc/containers`` (a bind mount of the node's directory): a hermetic podman whose graphroot
is the node's own and whose ``additionalimagestores`` is the ONE shared squash store, with
squashstore's mount program, so ``srun podman run IMAGE`` works as it would on a site.
Everything else (the store, the graphroots) is one shared file system, as a parallel file
system would share it. ``ProctrackType`` is chosen per cluster (``proctrack/cgroup`` with
cgroup v1 here, or ``proctrack/linuxproc``); ``Epilog``/``Prolog`` are optional.

`Cluster.close` stops every daemon by the pid in its pid file, kills what is left in the nodes'
namespaces (FUSE servers, conmon), and removes its directory; the nodes' namespaces vanish
with their last process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from support.podman import REGISTRIES_CONF, containers_conf, storage_conf

NODES = ("n1", "n2", "n3")
PROCTRACKS = ("proctrack/cgroup", "proctrack/linuxproc")
NODE_RUNROOT = Path("/run/containers/storage")
"""Each node's podman runroot: on the node's own tmpfs /run (short, as podman wants)."""
START_TIMEOUT = 60.0


def _free_port_range(count: int) -> int:
    """A first port such that ``count`` consecutive loopback ports are free now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65000:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free range of loopback ports")


def slurm_conf(base: Path, proctrack: str, first_port: int, epilog: Path | None,
               prolog: Path | None) -> str:
    nodes = len(NODES)
    lines = [
        "ClusterName=sqs",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={first_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={base}/state",
        f"SlurmdSpoolDir={base}/spool/%n",
        f"SlurmctldPidFile={base}/ctld.pid",
        f"SlurmdPidFile={base}/d-%n.pid",
        f"SlurmctldLogFile={base}/ctld.log",
        f"SlurmdLogFile={base}/d-%n.log",
        f"ProctrackType={proctrack}",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "DefMemPerCPU=100",
        "AuthType=auth/munge",
        f"AuthInfo=socket={base}/munge.sock",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "KillWait=2",
        "MinJobAge=2",
        "InactiveLimit=0",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        f"NodeName=n[1-{nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 "
        f"Port=[{first_port + 1}-{first_port + nodes}] CPUs=2 RealMemory=2000 State=UNKNOWN",
        f"PartitionName=p Nodes=n[1-{nodes}] Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=YES",
    ]
    if epilog is not None:
        lines.append(f"Epilog={epilog}")
    if prolog is not None:
        lines.append(f"Prolog={prolog}")
    return "\n".join(lines) + "\n"


CGROUP_CONF = "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n"


@dataclass
class Node:
    """One slurmd: its name, its own directory (podman's graphroot and config), its pid."""

    name: str
    dir: Path
    pid: int = 0

    @property
    def graphroot(self) -> Path:
        return self.dir / "root"

    @property
    def etc(self) -> Path:
        return self.dir / "etc"


class Cluster:
    """A running 3-node Slurm cluster (see the module docstring)."""

    def __init__(self, store: Path, proctrack: str = "proctrack/cgroup",
                 mount_program: str | None = None, epilog: Path | None = None,
                 prolog: Path | None = None, env: Mapping[str, str] | None = None,
                 script_env: Mapping[str, str] | None = None) -> None:
        assert proctrack in PROCTRACKS, proctrack
        # Short: the munge socket path must fit a sockaddr_un.
        self.base = Path(tempfile.mkdtemp(prefix="sqsl-", dir="/tmp"))
        self.base.chmod(0o755)
        self.store = store
        self.proctrack = proctrack
        self.conf = self.base / "slurm.conf"
        self.nodes = [Node(n, self.base / "nodes" / n) for n in NODES]
        self.env = dict(env if env is not None else os.environ)
        for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF",
                    "SLURM_JOB_ID", "SLURM_JOBID"):
            self.env.pop(key, None)
        self.env["SLURM_CONF"] = str(self.conf)
        self._procs: list[subprocess.Popen[bytes]] = []
        try:
            epilog, prolog = (self._wrap(which, script, script_env or {}) if script else None
                              for which, script in (("epilog", epilog), ("prolog", prolog)))
            self._start(mount_program, epilog, prolog)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ start

    def _wrap(self, which: str, script: Path, env: Mapping[str, str]) -> Path:
        """A wrapper that sets ``env`` (what /etc/squashstore/slurm.env gives a site's nodes)
        and execs ``script``, since slurmd gives prologs and epilogs no environment of ours."""
        wrapper = self.base / which
        lines = ["#!/bin/sh", *(f"export {k}='{v}'" for k, v in env.items()),
                 f'exec {script} "$@"']
        wrapper.write_text("\n".join(lines) + "\n")
        wrapper.chmod(0o755)
        return wrapper

    def _start(self, mount_program: str | None, epilog: Path | None,
               prolog: Path | None) -> None:
        base = self.base
        for sub in ("state", "spool", "munge"):
            (base / sub).mkdir()
        (base / "munge").chmod(0o700)
        key = base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(
            ["munged", "--force", f"--socket={base}/munge.sock", f"--key-file={key}",
             f"--pid-file={base}/munged.pid", f"--log-file={base}/munged.log",
             f"--seed-file={base}/munge/seed"], check=True, capture_output=True)
        first_port = _free_port_range(len(NODES) + 1)
        self.conf.write_text(slurm_conf(base, self.proctrack, first_port, epilog, prolog))
        (base / "cgroup.conf").write_text(CGROUP_CONF)
        for node in self.nodes:
            self._node_files(node, mount_program)
        subprocess.run(["slurmctld", "-c", "-i", "-f", str(self.conf)], check=True,
                       capture_output=True, env=self.env)
        for node in self.nodes:
            self._start_node(node)
        self._wait_idle()

    def _node_files(self, node: Node, mount_program: str | None) -> None:
        node.graphroot.mkdir(parents=True)
        for sub in ("tmp", "net", "vol", "etc"):
            (node.dir / sub).mkdir(exist_ok=True)
        (node.etc / "containers.conf").write_text(containers_conf(node.dir))
        (node.etc / "storage.conf").write_text(
            storage_conf(node.dir, [self.store], mount_program, NODE_RUNROOT))
        (node.etc / "registries.conf").write_text(REGISTRIES_CONF)
        policy = Path("/etc/containers/policy.json")
        (node.etc / "policy.json").write_text(
            policy.read_text() if policy.is_file()
            else '{"default": [{"type": "insecureAcceptAnything"}]}\n')

    def _start_node(self, node: Node) -> None:
        script = (
            f"hostname {node.name} && mount -t tmpfs -o mode=755 tmpfs /run && "
            f"mount --bind {node.etc} /etc/containers && "
            f"exec slurmd -f {self.conf} -N {node.name}")
        subprocess.run(["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script],
                       check=True, capture_output=True, env=self.env, cwd="/")
        pid_file = self.base / f"d-{node.name}.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):
                node.pid = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.05)
        raise RuntimeError(f"slurmd {node.name} wrote no pid file: {self.log(node.name)}")

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        out = ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                                  text=True, env=self.env, check=False)
            out = proc.stdout
            states = {f[0]: f[1] for f in (line.split() for line in out.splitlines())
                      if len(f) == 2}
            if all(states.get(n.name) == "idle" for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError(f"nodes not idle after {START_TIMEOUT:.0f}s: {out!r}\n"
                           + self.log("ctld"))

    # ------------------------------------------------------------------ use

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def log(self, which: str) -> str:
        """The tail of slurmctld's (``ctld``) or a node's slurmd log."""
        path = self.base / ("ctld.log" if which == "ctld" else f"d-{which}.log")
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-40:])
        return ""

    def run(self, *argv: str, timeout: float = 120, check: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm client command (``srun``, ``sbatch``, ``scancel``...) from outside."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, check=False,
                              stdin=subprocess.DEVNULL, cwd="/")
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n"
                                 f"{proc.stderr}\n--- ctld\n{self.log('ctld')}")
        return proc

    def popen(self, *argv: str, env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[str]:
        """A Slurm client command in the background (closed by `close`)."""
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**self.env, **(env or {})},
                                stdin=subprocess.DEVNULL, cwd="/")
        self._procs.append(proc)  # type: ignore[arg-type]
        return proc

    def on_node(self, name: str, *argv: str, timeout: float = 120, check: bool = True,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command on a node outside any job (as the node's cron or an admin would)."""
        node = self.node(name)
        proc = subprocess.run(["nsenter", "-t", str(node.pid), "-m", "-u", "--", *argv],
                              capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, check=False,
                              stdin=subprocess.DEVNULL, cwd="/")
        if check and proc.returncode != 0:
            raise AssertionError(f"on {name}: {' '.join(argv)}: exit {proc.returncode}\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def mountinfo(self, name: str) -> list[tuple[str, str]]:
        """(mount point, fstype) of every mount in a node's mount namespace."""
        out = []
        with open(f"/proc/{self.node(name).pid}/mountinfo", encoding="utf-8",
                  errors="surrogateescape") as file:
            for line in file:
                left, _, right = line.partition(" - ")
                out.append((left.split()[4].replace("\\040", " "), right.split()[0]))
        return out

    def squash_mounts(self, name: str) -> list[str]:
        """The mount points below the shared store in a node's namespace."""
        prefix = str(self.store.resolve()) + "/"
        return sorted(p for p, _ in self.mountinfo(name) if p.startswith(prefix))

    def registry(self, name: str) -> list[dict[str, object]]:
        """The records of a node's squashstore mount registry (its /run/squashstore, read
        through /proc/PID/root: no process started)."""
        folder = Path(f"/proc/{self.node(name).pid}/root/run/squashstore/mounts")
        out = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(path.read_bytes()))
        return out

    def wait_jobs_gone(self, timeout: float = 60) -> None:
        """Until slurmctld lists no job (epilogs included: completing jobs are listed)."""
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-o", "%i %t").stdout
            if not out.strip():
                return
            time.sleep(0.1)
        raise AssertionError(f"jobs left after {timeout:.0f}s: {out}")

    def namespace_pids(self, name: str) -> list[int]:
        """Processes in a node's mount namespace (FUSE servers, conmon, slurmstepd...)."""
        try:
            ns = os.readlink(f"/proc/{self.node(name).pid}/ns/mnt")
        except OSError:
            return []
        return [int(p) for p in _pids() if _readlink(f"/proc/{p}/ns/mnt") == ns]

    # ------------------------------------------------------------------ stop

    def reset(self, squashstore: str) -> None:
        """After a failed test: kill the nodes' containers (a cancelled job's container
        outlives it) and lazily unmount every squash mount of every node."""
        ids = {c for n in self.nodes for c in _container_ids(n.graphroot)}
        for pid in [int(p) for p in _pids() if ids and _libpod_id(p) in ids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            self.on_node(node.name, squashstore, "umount", "--all", "--lazy", check=False)

    def close(self) -> None:
        """Stop everything (pid files, then the nodes' leftovers) and remove the directory."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        with contextlib.suppress(Exception):
            self.run("scancel", "--user=root", check=False, timeout=10)
        namespaces = {n.name: _readlink(f"/proc/{n.pid}/ns/mnt") if n.pid else None
                      for n in self.nodes}
        pids = [p for p in (_pid_of(self.base / f"d-{n.name}.pid") for n in self.nodes) if p]
        pids += [p for p in (_pid_of(self.base / "ctld.pid"),
                             _pid_of(self.base / "munged.pid")) if p]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _wait_gone(pids, 10.0)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # What the nodes still run (FUSE servers, conmon, containers) goes too: the
        # namespaces, and the mounts only they hold, vanish with it.
        # Containers have mount namespaces of their own, and podman (cgroupfs) moves them out
        # of the job's cgroups into /libpod_parent/libpod-<id>: a cancelled job's container
        # outlives it. They are found by their container ids.
        ids = {c for n in self.nodes for c in _container_ids(n.graphroot)}
        left = [int(p) for p in _pids()
                if _readlink(f"/proc/{p}/ns/mnt") in {v for v in namespaces.values() if v}
                or (ids and _libpod_id(p) in ids)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_gone(left, 10.0)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.base)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pids() -> Iterator[str]:
    return (e.name for e in os.scandir("/proc") if e.name.isdigit())


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _container_ids(graphroot: Path) -> set[str]:
    try:
        records = json.loads((graphroot / "overlay-containers" / "containers.json").read_text())
    except (OSError, ValueError):
        return set()
    return {str(r.get("id")) for r in records if isinstance(r, dict)}


def _libpod_id(pid: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    found = re.search(r"/libpod-([0-9a-f]{64})", text)
    return found.group(1) if found else None


def _pid_of(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
            return
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"
