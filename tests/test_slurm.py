"""Slurm: jobs on many nodes run from one shared squash store (real Slurm, real podman).

A 3-node cluster on this machine (tests/support/slurm.py: one slurmd per node in its own mount
and UTS namespace, each node its own podman graphroot and runroot, all with the ONE shared
squash store in ``additionalimagestores`` and squashstore's mount program) runs every test under
``proctrack/cgroup`` (cgroup v1: Slurm kills every process in a job's cgroup at its end) and
under ``proctrack/linuxproc``. Proven here: a job runs a container on every node from the store;
a job's end never takes the FUSE server another job's container reads from; the epilog leaves
no squash mount after the last job; two nodes migrating one image at once publish it once; one
node's cleanup never touches another node's mounts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from squashstore.mounts import MountRecord
from support.fixture_trees import write_base_tar
from support.podman import Podman
from support.slurm import PROCTRACKS, Cluster

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
IMAGE = "localhost/slurm-app:1"
PAYLOAD = "/opt/payload"
"""A directory of the image with files a container reads late (never cached before)."""


def _cli_env(store: Path, podman: Podman | None = None) -> dict[str, str]:
    env = dict(podman.env if podman is not None else os.environ)
    env["SQUASHSTORE_STORE"] = str(store)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _payload_tar(work: Path) -> Path:
    """The base rootfs plus PAYLOAD: 40 files of 64 KiB of distinct bytes each."""
    tar = write_base_tar(work / "base.tar")
    with tarfile.open(tar, "a") as tf:
        info = tarfile.TarInfo("opt/payload")
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(info)
        for i in range(40):
            data = (f"file {i} ".encode() * 8192)[:65536]
            info = tarfile.TarInfo(f"opt/payload/f{i:02d}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return tar


@pytest.fixture(scope="module")
def store(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared squash store, holding IMAGE (migrated with the CLI from the test podman)."""
    work = tmp_path_factory.mktemp("slurm")
    podman.import_tar(_payload_tar(work), IMAGE, 'CMD ["/bin/sh"]', "ENV PATH=/bin")
    root = Path(tempfile.mkdtemp(prefix="sqss-", dir="/tmp")) / "store"
    env = _cli_env(root, podman)
    env["SQUASHSTORE_RUNTIME_DIR"] = str(work / "run")
    subprocess.run([str(BIN / "squashstore"), "migrate", IMAGE, "--no-mount"],
                   env=env, check=True, capture_output=True, timeout=300)
    try:
        yield root
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


@pytest.fixture(scope="module", params=PROCTRACKS, ids=lambda p: p.split("/")[1])
def cluster(request: pytest.FixtureRequest, store: Path) -> Iterator[Cluster]:
    with Cluster(store, request.param,
                 mount_program=str(BIN / "squashstore-mount-program"),
                 epilog=REPO / "contrib" / "slurm" / "epilog",
                 prolog=REPO / "contrib" / "slurm" / "prolog",
                 env=_cli_env(store),
                 script_env={"SQUASHSTORE": str(BIN / "squashstore"),
                             "SQUASHSTORE_STORE": str(store)}) as c:
        yield c


@pytest.fixture
def idle(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with no job and no squash mount on any node, before and after the test."""
    _assert_no_mounts_left(cluster)
    yield cluster
    cluster.run("scancel", "--user=root", check=False)  # (a failed test's jobs)
    try:
        _assert_no_mounts_left(cluster)
    except AssertionError:
        cluster.reset(str(BIN / "squashstore"))  # so that the next tests start clean
        raise


def _assert_no_mounts_left(cluster: Cluster) -> None:
    cluster.wait_jobs_gone()
    for node in ("n1", "n2", "n3"):
        assert cluster.squash_mounts(node) == [], (node, cluster.log(node))
        assert cluster.registry(node) == [], node


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what}")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _payload(i: int) -> bytes:
    return (f"file {i} ".encode() * 8192)[:65536]


MOUNTED = ("grep -c ' {store}/overlay/[0-9a-f]*/diff ' /proc/self/mountinfo || true")


def test_a_job_runs_a_container_on_every_node_and_the_epilog_unmounts_after_it(
        idle: Cluster) -> None:
    cluster = idle
    script = (f"echo $(hostname) $(podman run --rm --pull=never {IMAGE} "
              f"cat /etc/config {PAYLOAD}/f07 | md5sum | cut -c1-32) "
              f"$({MOUNTED.format(store=cluster.store.resolve())})")
    out = cluster.run("srun", "-N3", "--ntasks-per-node=1", "sh", "-c", script).stdout
    lines = sorted(line.split() for line in out.splitlines())
    expected = _md5(b"base config\n" + _payload(7))
    # Every node read the image right and had it mounted once, inside the job.
    assert lines == [[n, expected, "1"] for n in ("n1", "n2", "n3")], out
    # `idle` then checks that the epilog left no mount and no record on any node.


def test_a_jobs_end_never_breaks_another_jobs_container(idle: Cluster, tmp_path: Path) -> None:
    """Job A's container mounts the image on n2 (its FUSE server starts inside job A); job B's
    container on n2 starts next; A ends (under proctrack/cgroup Slurm kills everything in A's
    cgroup; A's epilog runs); B's container then reads files it never read before."""
    cluster = idle
    signal_dir = tmp_path / "sig"
    signal_dir.mkdir()
    job_a = cluster.popen("srun", "-w", "n2", "--oversubscribe", "-J", "job-a", "podman",
                          "run", "--rm", "--pull=never", "-v", f"{signal_dir}:/sig", IMAGE,
                          "sh", "-c", "until [ -e /sig/a ]; do sleep 0.05; done")
    _wait(lambda: cluster.squash_mounts("n2") and cluster.registry("n2"), 60,
          "job A's mount on n2")
    # The server left job A's cgroups (under proctrack/cgroup it was started in them).
    [record] = cluster.registry("n2")
    cgroups = Path(f"/proc/{record['pid']}/cgroup").read_text()
    assert "slurm" not in cgroups and "job_" not in cgroups, cgroups
    reader = (f"until [ -e /sig/go ]; do sleep 0.05; done; "
              f"cat {PAYLOAD}/* | md5sum; ls {PAYLOAD} | wc -l")
    job_b = cluster.popen("srun", "-w", "n2", "--oversubscribe", "-J", "job-b", "podman",
                          "run", "--rm", "--pull=never", "-v", f"{signal_dir}:/sig", IMAGE,
                          "sh", "-c", reader)
    _wait(lambda: _running_containers(cluster, "n2") >= 2, 120, "both containers running")
    (signal_dir / "a").touch()
    _, err_a = job_a.communicate(timeout=120)
    assert job_a.returncode == 0, err_a
    _wait(lambda: "job-a" not in cluster.run("squeue", "-h", "-o", "%j").stdout, 60,
          "job A gone (its epilog done)")
    time.sleep(0.3)  # what the job's end kills is dead by now
    assert len(cluster.squash_mounts("n2")) == 1, "A's epilog unmounted B's image"
    (signal_dir / "go").touch()
    out_b, err_b = job_b.communicate(timeout=120)
    expected = _md5(b"".join(_payload(i) for i in range(40)))
    assert job_b.returncode == 0 and out_b.split() == [expected, "-", "40"], (out_b, err_b)


def test_the_prolog_premounts_the_images_a_job_declares(idle: Cluster) -> None:
    cluster = idle
    mounted = MOUNTED.format(store=cluster.store.resolve())
    out = cluster.run("srun", "-N3", f"--comment=squashstore={IMAGE}", "sh", "-c",
                      f"echo $(hostname) $({mounted})").stdout
    assert sorted(out.split("\n")[:-1]) == ["n1 1", "n2 1", "n3 1"], out
    # A declaration the prolog cannot honour never fails the job (nor drains the node).
    out = cluster.run("srun", "-N1", "-w", "n1", "--comment=squashstore=localhost/no-such:1",
                      "sh", "-c", f"echo $({mounted})").stdout
    assert out.split() == ["0"]
    assert "drain" not in cluster.run("sinfo", "-h", "-N", "-o", "%N %t").stdout


def test_an_epilog_keeps_the_mounts_another_job_on_the_node_claims(idle: Cluster,
                                                                   tmp_path: Path) -> None:
    """Job B declared IMAGE (the prolog mounted it) and has not started a container yet; job A
    ran a container of IMAGE on the same node and ends: A's epilog leaves B's mount."""
    cluster = idle
    go = tmp_path / "go"
    job_b = cluster.popen("srun", "-w", "n3", "--oversubscribe", "-J", "job-b",
                          f"--comment=squashstore={IMAGE}", "sh", "-c",
                          f"until [ -e {go} ]; do sleep 0.05; done; "
                          f"podman run --rm --pull=never {IMAGE} cat {PAYLOAD}/f03 | md5sum")
    _wait(lambda: cluster.squash_mounts("n3"), 60, "job B's premount on n3")
    cluster.run("srun", "-w", "n3", "--oversubscribe", "-J", "job-a", "podman", "run", "--rm",
                "--pull=never", IMAGE, "true")
    _wait(lambda: "job-a" not in cluster.run("squeue", "-h", "-o", "%j").stdout, 60,
          "job A gone (its epilog done)")
    record = cluster.registry("n3")
    assert len(cluster.squash_mounts("n3")) == 1 and len(record) == 1, record
    assert [c["job"] for c in record[0]["claims"]] == [_job_id(cluster, "job-b")]
    go.touch()
    out, err = job_b.communicate(timeout=120)
    assert job_b.returncode == 0 and out.split()[0] == _md5(_payload(3)), err


def test_a_nodes_cleanup_gc_and_umount_never_touch_another_nodes_mounts(
        idle: Cluster, tmp_path: Path) -> None:
    """n2 runs a container from the store; n1 has a mount of the same image nobody uses. On
    n1, ``gc`` (nothing to collect), ``cleanup --grace 0`` and ``umount --all`` act on n1's
    mount only."""
    cluster = idle
    go = tmp_path / "go"
    tmp_path.chmod(0o755)
    job = cluster.popen("srun", "-w", "n2", "-J", "reader", "podman", "run", "--rm",
                        "--pull=never", "-v", f"{tmp_path}:/sig", IMAGE, "sh", "-c",
                        "until [ -e /sig/go ]; do sleep 0.05; done; "
                        f"cat {PAYLOAD}/* | md5sum")
    _wait(lambda: _running_containers(cluster, "n2") == 1, 60, "n2's container")
    n2_mounts, n2_records = cluster.squash_mounts("n2"), cluster.registry("n2")
    squashstore = str(BIN / "squashstore")
    config = tmp_path / "config.toml"
    config.write_text("[cleanup]\nmin_age = 0\n")
    # gc removes no image in use or named: it must leave both nodes' mounts.
    for command, unmounts in ((["gc"], False), (["cleanup", "--grace", "0"], True),
                              (["umount", "--all"], True)):
        cluster.on_node("n1", squashstore, "mount", IMAGE)
        assert cluster.squash_mounts("n1") == n2_mounts
        cluster.on_node("n1", squashstore, *command, env={"SQUASHSTORE_CONFIG": str(config)})
        assert cluster.squash_mounts("n1") == ([] if unmounts else n2_mounts), command
        assert cluster.squash_mounts("n2") == n2_mounts, command
        assert cluster.registry("n2") == n2_records, command
    go.touch()
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert out.split()[0] == _md5(b"".join(_payload(i) for i in range(40)))


def test_two_nodes_migrating_one_image_at_once_publish_it_once(
        idle: Cluster, archive: Path, tmp_path: Path) -> None:
    """n1 and n2 migrate the same archive into the shared store in one job, while n3 runs
    ``gc`` over and over: both succeed, the store holds the image once, and it verifies."""
    cluster = idle
    squashstore = str(BIN / "squashstore")
    before = _store_state(cluster.store)
    stop = tmp_path / "stop"
    gc_loop = cluster.popen("srun", "-w", "n3", "-J", "gc", "sh", "-c",
                            f"until [ -e {stop} ]; do {squashstore} gc || exit 1; done")
    try:
        out = cluster.run("srun", "-N2", "-w", "n1,n2", "-J", "migrate", "-l", squashstore,
                          "migrate", f"oci-archive:{archive}", "--no-mount", timeout=300)
    finally:
        stop.touch()
    assert len([line for line in out.stdout.splitlines() if MIGRATED in line]) == 2, out
    _, err = gc_loop.communicate(timeout=300)
    assert gc_loop.returncode == 0, err
    after = _store_state(cluster.store)
    assert after["names"].count(MIGRATED) == 1, after
    assert len(after["layers"]) == len(before["layers"]) + 1, (before, after)
    assert len(after["squash"]) == len(before["squash"]) + 1, (before, after)
    cluster.on_node("n3", squashstore, "verify")
    cluster.on_node("n3", squashstore, "rmi", MIGRATED)
    assert _store_state(cluster.store) == before


MIGRATED = "localhost/slurm-migrated:1"


@pytest.fixture(scope="module")
def archive(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An oci-archive of MIGRATED: the base rootfs and 24 MB of random bytes (so squashing
    takes a while and the two nodes overlap)."""
    work = tmp_path_factory.mktemp("slurm-archive")
    tar = write_base_tar(work / "base.tar")
    with tarfile.open(tar, "a") as tf:
        for i in range(3):
            data = os.urandom(8 << 20)
            info = tarfile.TarInfo(f"opt/blob{i}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    podman.import_tar(tar, MIGRATED, 'CMD ["/bin/sh"]')
    out = podman.save(MIGRATED, work / "migrated.tar")
    out.chmod(0o644)
    return out


def _store_state(store: Path) -> dict[str, list[str]]:
    images = json.loads((store / "overlay-images" / "images.json").read_text())
    return {"names": sorted(n for r in images for n in r.get("names", [])),
            "layers": sorted(p.name for p in (store / "overlay").iterdir() if p.name != "l"),
            "squash": sorted(p.name for p in store.rglob("*.sqfs"))}


def test_the_epilog_recovers_a_dead_mount(idle: Cluster) -> None:
    """A mount whose FUSE server was killed (ENOTCONN) is gone, record and all, after the
    next job on the node ends."""
    cluster = idle
    cluster.on_node("n1", str(BIN / "squashstore"), "mount", IMAGE)
    [record] = cluster.registry("n1")
    os.kill(int(str(record["pid"])), signal.SIGKILL)
    _wait(lambda: _gone(int(str(record["pid"]))), 10, "the server gone")
    cluster.run("srun", "-w", "n1", "true")
    # `idle` checks that nothing is left on any node (mount and record).


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _job_id(cluster: Cluster, name: str) -> str:
    return cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.strip()


def _running_containers(cluster: Cluster, node: str) -> int:
    out = cluster.on_node(node, "podman", "ps", "-q", check=False).stdout
    return len(out.split())


def test_detach_finds_the_job_cgroups_to_leave() -> None:
    from squashstore import detach, host

    text = ("9:name=systemd:/\n6:freezer:/slurm_n2/uid_0/job_2/step_0\n"
            "4:memory:/process_api/x\n2:cpu,cpuacct:/slurm/uid_0/job_7/step_batch\n"
            "0::/system.slice/slurmstepd.scope/job_3/step_0/user/task_0\n")
    found = detach.parse_cgroups(text)
    assert [detach.job_parent(m.path) for m in found] == [
        None, "/squashstore", None, "/squashstore", "/system.slice/squashstore"]
    entries = host.parse_mountinfo(
        "30 25 0:26 / /sys/fs/cgroup/freezer rw,relatime shared:9 - cgroup cgroup rw,freezer\n"
        "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert [detach.hierarchy_root(m, entries) for m in found] == [
        None, Path("/sys/fs/cgroup/freezer"), None, Path("/sys/fs/cgroup/cpu,cpuacct"),
        Path("/sys/fs/cgroup/unified")]
    assert not detach.in_job(os.getpid()) or "slurm" in detach.describe(os.getpid())


def test_job_comments_declare_images_and_claims_follow_jobs() -> None:
    from squashstore import jobs, slurm

    assert slurm.declared_images("squashstore=a:1,b:2 other=x;squashstore:c") == [
        "a:1", "b:2", "c"]
    assert slurm.declared_images("nothing here") == []
    claim = jobs.current_job({"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1"})
    assert claim is not None and (claim.job, claim.node) == ("12", "n1")
    assert jobs.current_job({}) is None
    claims = jobs.add_claim(jobs.add_claim([], claim), claim)
    assert [c.job for c in claims] == ["12"]
    old = jobs.JobClaim("7", "n1", 0.0)
    claims = jobs.add_claim(claims, old)
    now = claim.since + 1
    assert [c.job for c in jobs.live_claims(claims, set(), now)] == ["12"]  # 7: old, gone
    assert [c.job for c in jobs.live_claims(claims, {"7"}, now)] == ["12", "7"]
    assert jobs.drop_claims(claims, "12") == [old]
    # Records keep claims apart from container uses; older records without them still read.
    record = MountRecord("i", "l", "/s", "/m", "fuse", 1, 0.0, claims=claims)
    assert MountRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    plain = {k: v for k, v in record.to_json().items() if k != "claims"}
    assert MountRecord.from_json(plain).claims == []


@pytest.mark.parametrize(("job", "message"), [
    (None, "no Slurm job: SLURM_JOB_ID is not set"),
    ("12; rm -rf /", "SLURM_JOB_ID '12; rm -rf /' is not a Slurm job id (digits)"),
    ("\u0661\u0662", "is not a Slurm job id"),  # Arabic-Indic digits: isdigit() but not ours
])
def test_a_job_id_that_is_not_a_number_is_named_as_such(tmp_path: Path, job: str | None,
                                                         message: str) -> None:
    from test_store import cli

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["SQUASHSTORE_RUNTIME_DIR"] = str(tmp_path / "run")
    if job is not None:
        env["SLURM_JOB_ID"] = job
    for stage in ("prolog", "epilog"):
        proc = cli(tmp_path / "store", "slurm", stage, env=env, check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("squashstore: ") and proc.stderr.count("\n") == 1
        assert message in proc.stderr, proc.stderr
    uid = {"SLURM_JOB_ID": "5", "SLURM_JOB_UID": "\u0661"}  # not int()-able: no traceback
    from squashstore import slurm

    assert slurm.JobContext.from_env(uid).uid == 0


def test_a_hostile_comment_premounts_at_most_a_few_images_and_logs_printable_lines(
        tmp_path: Path) -> None:
    """Any user writes the job comment the root prolog reads: paths, `..`, shell
    metacharacters and terminal escapes are image names that are not found (never files),
    error lines are printable, and at most MAX_DECLARED images are looked at."""
    from squashstore import slurm
    from squashstore.mounts import Registry
    from squashstore.store import Store

    store = Store(tmp_path / "store")
    store.init()
    hostile = ["../../etc/passwd", "/etc/shadow", "$(reboot)", "`id`", "a|b", "\x1b[2J\x1b[31m",
               "x\x07y", "\u202eevil"] + [f"img{i}" for i in range(100)]
    comment = "squashstore=" + ",".join(hostile)
    ctx = slurm.JobContext("7", comment=comment)
    result = slurm.prolog(ctx, store, Registry(tmp_path / "run"))
    assert result.mounted == []
    assert len(result.errors) == 1 + slurm.MAX_DECLARED
    assert result.errors[0] == f"{len(hostile)} images declared: only the first 16 are premounted"
    for line in result.errors:
        assert line.isprintable() and len(line) < 400, line
    assert "\\x1b[2J" in result.errors[6]
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.json"))


def test_only_roots_slurmstepd_counts_as_a_running_job() -> None:
    """A process any user names ``slurmstepd: [JOB.0]`` kept JOB's claims alive (its mounts
    never unmounted by the epilog or cleanup); slurmstepd runs as root."""
    import pwd

    from squashstore import jobs

    nobody = pwd.getpwnam("nobody").pw_uid
    fakes = {}
    for job, uid in (("424242", nobody), ("434343", 0)):
        fakes[job] = subprocess.Popen(
            [f"slurmstepd: [{job}.0]", "30"], executable="/bin/sleep", user=uid)
    try:
        deadline = time.monotonic() + 5
        while "434343" not in jobs.jobs_on_node() and time.monotonic() < deadline:
            time.sleep(0.05)
        running = jobs.jobs_on_node()
        assert "434343" in running and "424242" not in running
    finally:
        for fake in fakes.values():
            fake.kill()
            fake.wait()
