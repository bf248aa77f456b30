"""Registries: image names and registries.conf, the `docker://` source, login/logout, and
squashstore's own artifacts (`push`/`pull`), against a real `docker-registry` the tests
start on 127.0.0.1 (TLS with a certificate made here, htpasswd basic auth, and token auth
with a small token issuer) and with skopeo and podman as independent clients."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import ssl
import string
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_migrate import Migration
from test_store import PYTHON, cli, unmount_below

from squashstore import names, oci
from squashstore.image import SourceError
from squashstore.mounts import Registry
from squashstore.registry.client import (
    BlobReader,
    Client,
    Deadline,
    RegistryError,
    RegistryOptions,
    TimedOut,
)
from squashstore.store import Store
from support.podman import Podman
from support.registry import (
    PASSWORD,
    USER,
    LocalHTTP,
    Pki,
    RegistryServer,
    TokenIssuer,
    make_pki,
)
from support.stallproxy import StallProxy

CREDS = f"{USER}:{PASSWORD}"

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("text", "registry", "local"), [
    ("alpine", "docker.io/library/alpine:latest", "localhost/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19", "localhost/alpine:3.19"),
    ("user/repo", "docker.io/user/repo:latest", "localhost/user/repo:latest"),
    ("docker.io/alpine", "docker.io/library/alpine:latest", "docker.io/library/alpine:latest"),
    ("index.docker.io/a/b", "docker.io/a/b:latest", "docker.io/a/b:latest"),
    ("localhost:5000/a@sha256:" + "1" * 64, "localhost:5000/a@sha256:" + "1" * 64,
     "localhost:5000/a@sha256:" + "1" * 64),
    ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t"),
])
def test_the_two_defaults(text: str, registry: str, local: str) -> None:
    assert names.registry_name(text) == registry
    assert names.local_name(text) == local


@pytest.mark.parametrize("bad", ["", "UPPER", "a b", "x::y", "a@sha256:12", "a:-t",
                                 "0" * 64, "bad_host.io:x/a",
                                 "h:65536/a", "h:99999/a", "h:0/a", "h:1234567/a"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(names.InvalidName):
        names.registry_name(bad)


def test_every_valid_port_parses() -> None:
    for port in (1, 80, 5000, 9999, 10000, 59999, 65000, 65499, 65529, 65535, "08080"):
        assert names.parse(f"h:{port}/a").domain == f"h:{port}"


_LOWER = string.ascii_lowercase + string.digits
_TAG_FIRST = string.ascii_letters + string.digits + "_"
# The languages of [a-z0-9]{1,8}([._-][a-z0-9]{1,4})? and :[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10},
# built from plain text strategies: st.from_regex cost about twice the CPU per example and
# tripped Hypothesis's too_slow health check once on the loaded machine.
_component = st.builds(lambda head, sep, tail: head + (sep + tail if sep else ""),
                       st.text(_LOWER, min_size=1, max_size=8),
                       st.sampled_from(["", ".", "_", "-"]),
                       st.text(_LOWER, min_size=1, max_size=4))
_tag = st.builds(lambda first, rest: ":" + first + rest, st.sampled_from(_TAG_FIRST),
                 st.text(_TAG_FIRST + ".-", max_size=10))


# too_slow measures the machine, not the parser: the assertions below still fail on a bug.
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(domain=st.sampled_from(["", "localhost/", "quay.io/", "r.example:5000/", "docker.io/"]),
       path=st.lists(_component, min_size=1, max_size=3),
       tag=st.one_of(st.just(""), _tag))
def test_parse_round_trips(domain: str, path: list[str], tag: str) -> None:
    text = domain + "/".join(path) + tag
    assert str(names.parse(text)) == text.replace("docker.io/", "docker.io/", 1)
    for normal in (names.registry_name, names.local_name):
        full = normal(text)
        assert normal(full) == full
        assert not names.parse(full).is_short


def _conf(tmp_path: Path, text: str, dropin: str = "") -> dict[str, str]:
    main = tmp_path / "registries.conf"
    main.write_text(text)
    home = tmp_path / "home"
    if dropin:
        d = home / ".config/containers/registries.conf.d"
        d.mkdir(parents=True)
        (d / "50-test.conf").write_text(dropin)
    return {"CONTAINERS_REGISTRIES_CONF": str(main), "HOME": str(home)}


def test_short_names_resolve_as_podman_does(tmp_path: Path) -> None:
    env = _conf(tmp_path, """
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "permissive"
[aliases]
"sqs-tool" = "registry.example:5000/tools/sqs-tool"
""", dropin="""
[aliases]
"sqs-other" = "docker.io/other"
""")
    conf = names.load_registries_conf(env)
    assert Path(env["CONTAINERS_REGISTRIES_CONF"]) in conf.files
    resolved = names.registry_candidates("sqs-tool:2", conf)
    assert [str(n) for n in resolved] == ["registry.example:5000/tools/sqs-tool:2"]
    assert [str(n) for n in names.registry_candidates("sqs-other", conf)] == [
        "docker.io/library/other:latest"]
    assert [str(n) for n in names.registry_candidates("sqs-unaliased", conf)] == [
        "quay.io/sqs-unaliased:latest", "docker.io/library/sqs-unaliased:latest"]
    assert [str(n) for n in names.registry_candidates("ghcr.io/a/b", conf)] == [
        "ghcr.io/a/b:latest"]
    assert names.local_candidates("sqs-unaliased", conf)[:2] == [
        "localhost/sqs-unaliased:latest", "quay.io/sqs-unaliased:latest"]


def test_enforcing_mode_refuses_an_ambiguous_short_name(tmp_path: Path) -> None:
    conf = names.load_registries_conf(_conf(tmp_path, """
unqualified-search-registries = ["quay.io", "docker.io"]
short-name-mode = "enforcing"
"""))
    with pytest.raises(SourceError, match="ambiguous"):
        names.registry_candidates("sqs-unaliased", conf)


def test_a_short_name_without_search_registries_is_one_clear_error(tmp_path: Path) -> None:
    conf = names.load_registries_conf(_conf(tmp_path, "unqualified-search-registries = []\n"))
    with pytest.raises(SourceError, match="no unqualified-search-registries"):
        names.registry_candidates("sqs-nothing-aliased", conf)


# --------------------------------------------------------------------------- a real registry


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def registries(pki: Pki, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, RegistryServer]]:
    """Three registries over TLS: no auth, htpasswd basic auth, token auth."""
    issuer = TokenIssuer(pki)
    base = tmp_path_factory.mktemp("registries")
    made: dict[str, RegistryServer] = {}
    try:
        for auth in ("none", "htpasswd", "token"):
            made[auth] = RegistryServer(base / auth, pki, auth, issuer)
        yield made
    finally:
        for server in made.values():
            server.close()
        issuer.close()


@pytest.fixture(scope="module")
def pushed(podman: Podman, fixture_images: dict[str, str], registries: dict[str, RegistryServer],
           pki: Pki) -> dict[str, str]:
    """Fixture images pushed by podman to the token registry (zstd: to the no-auth one,
    where podman knows no gzip copy of the layers to reuse): name -> docker:// reference."""
    host = registries["token"].host
    auth = ("--cert-dir", str(pki.certs), "--creds", CREDS)
    refs = {
        "gzip": f"{host}/fixtures/whiteouts:gzip",
        "zstd": f"{registries['none'].host}/fixtures/whiteouts-zstd:1",
        "base": f"{host}/fixtures/base:1",
        "list": f"{host}/fixtures/list:1",
    }
    podman.run("push", *auth, "--compression-format", "zstd", fixture_images["whiteouts"],
               "docker://" + refs["zstd"])
    podman.run("push", *auth, fixture_images["whiteouts"], "docker://" + refs["gzip"])
    podman.run("push", *auth, fixture_images["base"], "docker://" + refs["base"])
    podman.run("manifest", "create", "localhost/sqs-registry-list:1")
    try:
        podman.run("manifest", "add", "localhost/sqs-registry-list:1",
                   "containers-storage:" + fixture_images["hardlinks"])
        podman.run("manifest", "add", "--arch", "arm64", "localhost/sqs-registry-list:1",
                   "containers-storage:" + fixture_images["base"])
        podman.run("manifest", "push", "--all", *auth, "localhost/sqs-registry-list:1",
                   "docker://" + refs["list"])
    finally:
        podman.run("manifest", "rm", "localhost/sqs-registry-list:1", check=False)
    return {k: "docker://" + v for k, v in refs.items()}


class Site:
    """A store, its consumer podman, and the environment squashstore runs with (a private
    auth file, the test CA as --cert-dir)."""

    def __init__(self, base: Path, producer: Podman, make_podman: Any, pki: Pki) -> None:
        base.mkdir(parents=True)
        self.mig = Migration(base, producer, make_podman)
        self.authfile = base / "auth.json"
        self.env = {**self.mig.env, "REGISTRY_AUTH_FILE": str(self.authfile)}
        self.certs = pki.certs

    @property
    def store(self) -> Store:
        return self.mig.store

    def cli(self, *args: str, check: bool = True, tls: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        extra = ("--cert-dir", str(self.certs)) if tls else ()
        return cli(self.store.root, *args, *extra, env={**self.env, **(env or {})},
                   check=check)

    def image_id(self, out: subprocess.CompletedProcess[str]) -> str:
        return str(json.loads(out.stdout)["id"])

    def close(self) -> None:
        self.mig.consumer.close()
        Registry(self.mig.runtime_dir).umount_all(lazy=True)


@pytest.fixture
def make_site(tmp_path: Path, podman: Podman, make_podman: Any, pki: Pki
              ) -> Iterator[Callable[[str], Site]]:
    made: list[Site] = []

    def factory(name: str) -> Site:
        site = Site(tmp_path / name, podman, make_podman, pki)
        made.append(site)
        return site

    try:
        yield factory
    finally:
        for site in made:
            site.close()
        unmount_below(tmp_path)


def _ids(site: Site) -> dict[str, str]:
    """name -> image id in the site's store."""
    return {n: i.id for i in site.store.images() for n in i.names}


def _migrated_id(site: Site, source: str, *extra: str) -> str:
    site.cli("migrate", "--no-mount", "--creds", CREDS, *extra, source,
             tls=source.startswith("docker://"))
    images = site.store.images()
    match = [i for i in images if i.metadata.get("source", {}).get("reference") == source]
    assert match, f"{source} not in the store"
    return match[-1].id


@pytest.mark.podman
@pytest.mark.slow
def test_migrate_docker_equals_local_and_skopeo(
        make_site: Callable[[str], Site], pushed: dict[str, str], podman: Podman,
        fixture_images: dict[str, str], tmp_path: Path) -> None:
    """gzip and zstd layers: `migrate docker://` gives the image id (config and flattened
    tree digest) of migrating the original from podman's store, and of migrating skopeo's
    copy into an OCI layout."""
    site = make_site("a")
    local = _migrated_id(site, fixture_images["whiteouts"])
    for kind in ("gzip", "zstd"):
        remote = _migrated_id(make_site(f"docker-{kind}"), pushed[kind])
        layout = tmp_path / f"oci-{kind}"
        subprocess.run(["skopeo", "copy", "--src-cert-dir", str(site.certs), "--src-creds",
                        CREDS, pushed[kind], f"oci:{layout}:x"], check=True,
                       capture_output=True)
        copied = _migrated_id(make_site(f"skopeo-{kind}"), f"oci:{layout}:x")
        assert remote == local == copied, kind
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--cert-dir", str(site.certs), "--creds", CREDS,
         pushed["zstd"]], check=True, capture_output=True).stdout)
    assert {la["mediaType"] for la in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"}


@pytest.mark.podman
@pytest.mark.slow
def test_manifest_list_by_platform(make_site: Callable[[str], Site], pushed: dict[str, str],
                                   fixture_images: dict[str, str]) -> None:
    site = make_site("list")
    host_image = _migrated_id(site, pushed["list"])
    arm = _migrated_id(site, pushed["list"], "--platform", "linux/arm64")
    other = make_site("local")
    assert host_image == _migrated_id(other, fixture_images["hardlinks"])
    local_base = _migrated_id(other, fixture_images["base"])
    assert arm == local_base  # the list's arm64 entry is the base image
    assert arm != host_image
    bad = site.cli("migrate", "--no-mount", "--creds", CREDS, "--platform", "linux/s390x",
                   pushed["list"], check=False)
    assert bad.returncode == 1
    assert bad.stderr.startswith("squashstore: ") and bad.stderr.count("\n") == 1
    assert "linux/s390x" in bad.stderr and "linux/arm64" in bad.stderr


@pytest.mark.podman
@pytest.mark.slow
def test_push_pull_artifact_runs_in_podman(
        make_site: Callable[[str], Site], podman: Podman, fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pushed: dict[str, str]) -> None:
    """Converted once, pushed as the artifact the docs describe, pulled into a fresh store
    as the same image id, run by podman at once."""
    origin = make_site("origin")
    iid = _migrated_id(origin, fixture_images["base"])
    ref = f"{registries['token'].host}/squashed/base:v1"
    out = origin.cli("push", "--creds", CREDS, "--format", "json", fixture_images["base"], ref)
    pushed_digest = json.loads(out.stdout)["digest"]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--cert-dir", str(origin.certs),
                          "--creds", CREDS, "docker://" + ref], check=True,
                         capture_output=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == pushed_digest
    manifest = json.loads(raw)
    image = origin.store.resolve(iid)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == "application/vnd.squashstore.image.v1"
    assert manifest["config"] == {"mediaType": "application/vnd.squashstore.image.config.v1+json",
                                  "digest": "sha256:" + iid,
                                  "size": manifest["config"]["size"]}
    squash, split, chunks = manifest["layers"]
    assert squash["mediaType"] == "application/vnd.squashstore.image.squashfs.v1"
    assert squash["size"] == image.squash.stat().st_size
    assert squash["digest"] == "sha256:" + hashlib.sha256(image.squash.read_bytes()).hexdigest()
    assert squash["annotations"]["io.squashstore.diff-id"] == "sha256:" + image.layer
    assert split["mediaType"] == "application/vnd.squashstore.image.tar-split.v1+gzip"
    assert chunks["mediaType"] == "application/vnd.squashstore.image.chunk-digests.v1"
    assert chunks["size"] == 64 + 32 * -(-squash["size"] // 65536)
    assert not any(la["mediaType"].startswith("application/vnd.oci.")
                   for la in manifest["layers"])
    again = origin.cli("push", "--creds", CREDS, fixture_images["base"], ref)
    assert "already there" in again.stdout

    node = make_site("node")
    pulled = node.cli("pull", "--creds", CREDS, "--format", "json", ref)
    result = json.loads(pulled.stdout)
    assert result["id"] == iid and result["kind"] == "artifact"
    assert result["downloaded"] == squash["size"] + split["size"]
    assert node.store.resolve(iid).squash.read_bytes() == image.squash.read_bytes()
    assert node.mig.consumer.text("run", "--rm", "--pull=never", ref, "cat", "/etc/config") \
        == podman.text("run", "--rm", "--pull=never", fixture_images["base"], "cat",
                       "/etc/config")
    assert node.cli("verify", tls=False).returncode == 0
    # an ordinary image is migrated (podman-hpc's pull)
    plain = node.cli("pull", "--creds", CREDS, "--format", "json", pushed["base"])
    assert json.loads(plain.stdout)["kind"] == "image"


@pytest.mark.podman
@pytest.mark.slow
def test_eight_concurrent_pulls_download_once(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer]) -> None:
    origin = make_site("origin")
    iid = _migrated_id(origin, fixture_images["whiteouts"])
    server = registries["none"]
    ref = f"{server.host}/squashed/whiteouts:8"
    origin.cli("push", fixture_images["whiteouts"], ref)
    squash_digest = "sha256:" + hashlib.sha256(
        origin.store.resolve(iid).squash.read_bytes()).hexdigest()
    shared = make_site("shared")
    procs = [subprocess.Popen(
        [str(PYTHON), "-m", "squashstore.cli.main", "--store", str(shared.store.root), "pull",
         "--cert-dir", str(shared.certs), "--quiet", ref], env=shared.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, results
    assert {out.strip() for out, _ in results} == {iid}
    gets = [line for line in server.access_log().splitlines()
            if f'"GET /v2/squashed/whiteouts/blobs/{squash_digest}' in line]
    assert len(gets) == 1
    assert [i.id for i in shared.store.images()] == [iid]


@pytest.mark.podman
def test_login_and_logout_share_podmans_auth_file(
        make_site: Callable[[str], Site], podman: Podman, registries: dict[str, RegistryServer],
        fixture_images: dict[str, str]) -> None:
    site = make_site("login")
    basic, token = registries["htpasswd"].host, registries["token"].host
    env = {**podman.env, "REGISTRY_AUTH_FILE": str(site.authfile)}
    wrong = site.cli("login", "-u", USER, "-p", "wrong", basic, check=False)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    assert "wrong username or password" in wrong.stderr
    assert not site.authfile.exists()
    site.cli("login", "-u", USER, "-p", PASSWORD, basic)
    assert oct(site.authfile.stat().st_mode & 0o777) == "0o600"
    got = subprocess.run(["podman", "login", "--get-login", basic], env=env,
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == USER
    podman.run("push", "--cert-dir", str(site.certs), "--authfile", str(site.authfile),
               fixture_images["base"], f"docker://{basic}/viasqs/base:1")  # squashstore's login
    subprocess.run(["podman", "login", "--cert-dir", str(site.certs), "-u", USER, "-p",
                    PASSWORD, token], env=env, check=True, capture_output=True)
    podman.run("push", "--cert-dir", str(site.certs), "--authfile", str(site.authfile),
               fixture_images["base"], f"docker://{token}/viapodman/base:1")
    # squashstore reads podman's login (no --creds)
    out = site.cli("migrate", "--no-mount", f"docker://{token}/viapodman/base:1")
    assert "->" in out.stdout
    site.cli("logout", token, tls=False)
    assert site.cli("migrate", "--no-mount", f"docker://{token}/viapodman/base:1",
                    check=False).returncode == 1
    gone = subprocess.run(["podman", "login", "--get-login", token], env=env,
                          capture_output=True, text=True)
    assert gone.returncode != 0
    subprocess.run(["podman", "logout", basic], env=env, check=True, capture_output=True)
    again = site.cli("logout", basic, check=False, tls=False)
    assert again.returncode == 1 and "not logged into" in again.stderr


# --------------------------------------------------------------------------- bad input


def _one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("squashstore: ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def _nothing_left(site: Site) -> None:
    assert site.store.images() == []
    assert list((site.store.root / "squashstore" / "tmp").iterdir()) == []
    assert not list((site.store.root / "squashstore" / "squash").glob("*.sqfs"))


@pytest.mark.podman
def test_bad_references_and_credentials_are_one_line(
        make_site: Callable[[str], Site], pushed: dict[str, str],
        registries: dict[str, RegistryServer]) -> None:
    site = make_site("bad")
    token, basic = registries["token"].host, registries["htpasswd"].host
    wrong = site.cli("migrate", "--creds", f"{USER}:nope", pushed["gzip"], check=False)
    _one_line_error(wrong, "wrong username or password")
    anonymous = site.cli("migrate", pushed["gzip"], check=False)
    _one_line_error(anonymous, "not logged in")
    basic_wrong = site.cli("pull", "--creds", f"{USER}:nope", f"{basic}/a/b:1", check=False)
    _one_line_error(basic_wrong, "wrong username or password")
    missing = site.cli("migrate", "--creds", CREDS, f"docker://{token}/fixtures/base:nope",
                       check=False)
    _one_line_error(missing, "does not exist")
    unknown = site.cli("pull", "no-such-registry.invalid/a/b:1", check=False)
    _one_line_error(unknown, "unknown host")
    untrusted = site.cli("pull", "--creds", CREDS, pushed["base"], check=False, tls=False)
    _one_line_error(untrusted, "certificate")
    insecure = site.cli("export", "--tls-verify=false", "--creds", CREDS, pushed["base"],
                        "-o", str(site.store.root.parent / "x.tar"), tls=False)
    assert insecure.returncode == 0
    lazy = site.cli("pull", "--lazy", "--creds", CREDS, pushed["base"], check=False)
    _one_line_error(lazy, "--lazy")  # an ordinary image has no squash file to read lazily
    _nothing_left(site)


def _fresh_registry(base: Path, pki: Pki) -> RegistryServer:
    return RegistryServer(base, pki, "none")


def _unique_image(podman: Podman, base: Path, tag: str, mib: int) -> str:
    """A one-layer image with `mib` MiB of random bytes in /blob (content nobody else
    pushes)."""
    payload = base / f"{tag}.bin"
    with payload.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    tar = base / f"{tag}.tar"
    with tarfile.open(tar, "w") as t:
        t.add(payload, "blob")
    ref = f"localhost/sqs-registry-{tag}:1"
    podman.import_tar(tar, ref, 'CMD ["/blob"]')
    return ref


@pytest.mark.podman
def test_a_tampered_blob_is_refused_and_nothing_is_published(
        make_site: Callable[[str], Site], podman: Podman, pki: Pki, tmp_path: Path) -> None:
    server = _fresh_registry(tmp_path / "reg", pki)
    try:
        image = _unique_image(podman, tmp_path, "tamper", 2)
        remote = f"docker://{server.host}/t/image:1"
        podman.run("push", "--cert-dir", str(pki.certs), image, remote)
        origin = make_site("origin")
        iid = _migrated_id(origin, image)
        origin.cli("push", iid, f"{server.host}/t/artifact:1")
        squash = origin.store.resolve(iid).squash
        squash_digest = "sha256:" + hashlib.sha256(squash.read_bytes()).hexdigest()
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--cert-dir", str(pki.certs), remote],
            check=True, capture_output=True).stdout)
        for digest in (squash_digest, manifest["layers"][0]["digest"]):
            data = server.blob_data(digest)
            raw = bytearray(data.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            data.write_bytes(bytes(raw))
        site = make_site("victim")
        pulled = site.cli("pull", f"{server.host}/t/artifact:1", check=False)
        _one_line_error(pulled, "digest mismatch")
        migrated = site.cli("migrate", remote, check=False)
        _one_line_error(migrated)
        assert "digest mismatch" in migrated.stderr or "corrupt" in migrated.stderr
        _nothing_left(site)
    finally:
        server.close()


def _watch_and_kill(server: RegistryServer, store: Store, restart: bool) -> threading.Thread:
    """Kill `server` as soon as a download into `store`'s staging has begun."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for part in (store.root / "squashstore" / "tmp").glob("*/layer.sqfs"):
                with contextlib.suppress(OSError):
                    if part.stat().st_size > 0:
                        server.kill()
                        if restart:
                            time.sleep(0.3)
                            server.start()
                        return
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.podman
@pytest.mark.slow
def test_a_registry_killed_mid_download(make_site: Callable[[str], Site], podman: Podman,
                                        pki: Pki, tmp_path: Path) -> None:
    """Killed and back at once: the download resumes (Range) and the pull succeeds; killed
    for good: one line after the retries, nothing partial in the store."""
    server = _fresh_registry(tmp_path / "reg", pki)
    try:
        origin = make_site("origin")
        iid = _migrated_id(origin, _unique_image(podman, tmp_path, "big", 64))
        ref = f"{server.host}/k/big:1"
        origin.cli("push", iid, ref)
        back = make_site("back")
        watcher = _watch_and_kill(server, back.store, restart=True)
        assert back.cli("pull", "--no-mount", "--quiet", ref).stdout.strip() == iid
        watcher.join()
        assert server.process is not None
        assert back.store.resolve(iid).squash.read_bytes() == \
            origin.store.resolve(iid).squash.read_bytes()
        gone = make_site("gone")
        watcher = _watch_and_kill(server, gone.store, restart=False)
        started = time.monotonic()
        failed = gone.cli("pull", "--no-mount", ref, check=False)
        watcher.join()
        _one_line_error(failed, server.host)
        assert time.monotonic() - started < 60
        _nothing_left(gone)
    finally:
        server.close()


class _HostileRegistry(LocalHTTP):
    """A plain-HTTP 'registry' on 127.0.0.1 whose every answer is `behaviour`: ``loop``
    redirects to itself, ``endless`` answers 200 with a body without end, ``token`` asks
    for a bearer token from a realm that sends an endless body."""

    def __init__(self, behaviour: str) -> None:
        import http.server

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests += 1
                if behaviour == "loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if behaviour == "cut-once" and outer.requests == 1:
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    self.close_connection = True
                    return
                if behaviour == "cut-once":
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                if behaviour == "escape":
                    body = json.dumps({"errors": [{"code": "DENIED", "message":
                                       "\x1b]0;owned\x07\x1b[2J\u202e"}]}).encode()
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if behaviour == "token" and self.path.startswith("/v2/"):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="http://'
                                     f'{outer.host}/token",service="x"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                with contextlib.suppress(OSError):
                    chunk = b"[" * 65536
                    for _ in range(1 << 16):  # 4 GiB at most
                        self.wfile.write(chunk)

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        super().__init__(Handler)


def test_a_small_answer_cut_short_is_retried() -> None:
    hostile = _HostileRegistry("cut-once")
    try:
        client = Client(hostile.host, RegistryOptions(tls_verify=False), sleep=lambda _s: None)
        assert client.base() == f"http://{hostile.host}" and hostile.requests == 2
    finally:
        hostile.close()


def test_a_stall_limit_no_socket_takes_is_one_line(tmp_path: Path) -> None:
    """``[registry] stall = 1e308`` passed the config's check and overflowed the socket
    timeout once a registry answered: a traceback from urllib3. The config now refuses it
    in one line, and the client still caps a stall given to it directly."""
    hostile = _HostileRegistry("escape")
    try:
        conf = tmp_path / "conf.toml"
        conf.write_text("[registry]\nstall = 1e308\n")
        proc = cli(tmp_path / "store", "pull", "--tls-verify=false", f"{hostile.host}/a/b:1",
                   env={**os.environ, "SQUASHSTORE_CONFIG": str(conf)}, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "stall = 1e+308: expected seconds > 0, at most" in proc.stderr
        client = Client(hostile.host, RegistryOptions(tls_verify=False, stall=1e308))
        with pytest.raises(RegistryError, match="DENIED"):
            client.get_manifest("a/b", "1")
    finally:
        hostile.close()


@pytest.mark.parametrize(("behaviour", "message"), [
    ("loop", "too many redirects"),
    ("endless", "the answer is larger than 1048576 bytes"),
    ("token", "the answer is larger than 1048576 bytes"),
    ("escape", "DENIED"),
])
def test_a_hostile_registry_answer_is_one_line_at_once(behaviour: str, message: str) -> None:
    """A redirect loop was retried 5 times with backoff and then shown as requests' text;
    an endless answer to a small request (GET /v2/, a token) was read into memory whole."""
    hostile = _HostileRegistry(behaviour)
    try:
        client = Client(hostile.host, RegistryOptions(tls_verify=False))
        started = time.monotonic()
        with pytest.raises(RegistryError) as info:
            client.get_manifest("a/b", "1")
        assert message in str(info.value) and "\n" not in str(info.value)
        assert time.monotonic() - started < 10
        if behaviour == "escape":  # the registry's text reaches the terminal escaped
            proc = cli(Path("/nonexistent-store"), "pull", "--tls-verify=false",
                       f"{hostile.host}/a/b:1", check=False)
            assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
            assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in proc.stderr, proc.stderr
            assert proc.stderr.isascii() and proc.stderr[:-1].isprintable()
    finally:
        hostile.close()


@pytest.mark.podman
def test_a_manifest_nested_too_deeply_is_one_line(
        make_site: Callable[[str], Site], pki: Pki, tmp_path: Path) -> None:
    """distribution (Go, 10,000 levels) stores a manifest nested 5,000 deep that Python's
    parser cannot read: `pull` and `migrate` raised RecursionError from the artifact check;
    a nested artifact annotation did the same after the download."""
    from squashstore.registry import artifact

    server = _fresh_registry(tmp_path / "reg", pki)
    try:
        client = Client(server.host, RegistryOptions(cert_dir=pki.certs))
        config = b"{}"
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        client.upload_bytes("deep/img", config, config_digest)
        deep = "[" * 5000 + "]" * 5000
        manifest = ('{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1'
                    '+json", "config": {"mediaType": "application/vnd.oci.image.config.v1+json",'
                    f' "digest": "{config_digest}", "size": 2}}, "layers": [], "x": {deep}}}')
        client.put_manifest("deep/img", "1", manifest.encode(),
                            "application/vnd.oci.image.manifest.v1+json")
        site = make_site("deep")
        for command in (["pull", f"{server.host}/deep/img:1"],
                        ["migrate", f"docker://{server.host}/deep/img:1"]):
            _one_line_error(site.cli(*command, check=False), "nested too deeply")
        _nothing_left(site)
    finally:
        server.close()
    nested = artifact.Artifact(
        oci.Descriptor("", "sha256:" + "0" * 64, 2), oci.Descriptor("", "sha256:" + "1" * 64, 2),
        None, "sha256:" + "2" * 64, 1, {artifact.OPTIONS: deep})
    assert artifact._json_annotation(nested, artifact.OPTIONS) == {}


@pytest.mark.podman
def test_manifests_that_lie_about_sizes_are_one_line(
        make_site: Callable[[str], Site], pki: Pki, tmp_path: Path) -> None:
    """distribution stores manifests whose layer sizes are missing, negative, too small or
    far too large. Missing or negative meant an unbounded download (a hostile registry may
    send without end); too small and too large name what happened."""
    server = _fresh_registry(tmp_path / "reg", pki)
    try:
        client = Client(server.host, RegistryOptions(cert_dir=pki.certs))
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as tar:
            info = tarfile.TarInfo("f")
            info.size = 4000
            tar.addfile(info, io.BytesIO(os.urandom(4000)))
        blob = layer.getvalue()
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        client.upload_bytes("lie/img", blob, digest)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        client.upload_bytes("lie/img", config, config_digest)
        expected = {"none": "no size", "-5": "no size", "100": "sent more than the 100 bytes",
                    str(10**15): f"the registry has only {len(blob)} bytes of it"}
        site = make_site("lies")
        for size, message in expected.items():
            descriptor: dict[str, object] = {"mediaType": "application/vnd.oci.image.layer"
                                             ".v1.tar", "digest": digest}
            if size != "none":
                descriptor["size"] = int(size)
            manifest = {"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   "digest": config_digest, "size": len(config)},
                        "layers": [descriptor]}
            client.put_manifest("lie/img", f"s{size.lstrip('-')}", json.dumps(manifest).encode(),
                                "application/vnd.oci.image.manifest.v1+json")
            failed = site.cli("migrate", f"docker://{server.host}/lie/img:s{size.lstrip('-')}",
                              check=False)
            _one_line_error(failed, message)
        _nothing_left(site)
    finally:
        server.close()


@pytest.mark.podman
@pytest.mark.slow
def test_pull_through_a_stalling_registry_resumes_or_stops_at_the_timeout(
        make_site: Callable[[str], Site], podman: Podman, pki: Pki, tmp_path: Path) -> None:
    """A registry that hangs mid-blob: with ``[registry] stall = 1`` the pull resumes after a
    second; when it hangs for good, ``--timeout`` ends the pull with one line and nothing
    left behind (a Slurm prolog's own timeout must not hit first). `migrate` of the artifact
    says to pull it."""
    server = _fresh_registry(tmp_path / "reg", pki)
    proxies: list[StallProxy] = []
    try:
        origin = make_site("origin")
        iid = _migrated_id(origin, _unique_image(podman, tmp_path, "stall", 8))
        origin.cli("push", iid, f"{server.host}/s/img:1")
        proxies.append(StallProxy(server.port, after=1 << 20))
        site = make_site("once")
        config = Path(site.env["SQUASHSTORE_CONFIG"])
        config.write_text(config.read_text() + "[registry]\nstall = 1\n")
        started = time.monotonic()
        pulled = site.cli("pull", "--no-mount", "--quiet", f"{proxies[0].host}/s/img:1")
        assert pulled.stdout.strip() == iid
        assert proxies[0].hits == 1 and time.monotonic() - started < 60
        proxies.append(StallProxy(server.port, after=1 << 20, times=-1))
        late = make_site("late")
        started = time.monotonic()
        # 8 s: the manifest, config and TLS handshakes through the proxy must fit in it on a
        # loaded machine, so that the deadline fires inside the blob
        failed = late.cli("pull", "--no-mount", "--timeout", "8", f"{proxies[1].host}/s/img:1",
                          check=False)
        _one_line_error(failed, "gave up after 8 s", "at byte")
        assert proxies[1].hits >= 1 and time.monotonic() - started < 40
        _nothing_left(late)
        wrong = late.cli("migrate", f"docker://{server.host}/s/img:1", check=False)
        _one_line_error(wrong, "is a squashstore artifact", "squashstore pull")
        _nothing_left(late)
    finally:
        for proxy in proxies:
            proxy.close()
        server.close()


@pytest.mark.podman
def test_blob_reader_resumes_with_range(pki: Pki, tmp_path: Path) -> None:
    server = _fresh_registry(tmp_path / "reg", pki)
    try:
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(40 << 20))
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        client = Client(server.host, RegistryOptions(cert_dir=pki.certs))
        assert client.upload_blob("r/b", blob, digest)
        assert not client.upload_blob("r/b", blob, digest)  # already there: skipped
        reader = cast(BlobReader, client.open_blob("r/b", digest, blob.stat().st_size))
        head = reader.read(1 << 20)
        server.kill()
        server.start()
        rest = reader.read()
        assert hashlib.sha256(head + rest).hexdigest() == digest.removeprefix("sha256:")
        assert reader.resumes >= 1
    finally:
        server.close()


@pytest.mark.podman
def test_a_blob_that_stalls_breaks_or_lies_is_resumed_or_one_clear_line(
        pki: Pki, tmp_path: Path) -> None:
    """Against a real registry behind a proxy that stalls or cuts connections mid-blob: a
    stall (nothing for the stall limit) and a cut are resumed with Range; a registry gone
    mid-blob says how far the download got; a stall that never ends stops at the deadline;
    sizes that do not match the blob are said as such (not HTTP 416, not a digest
    mismatch after downloading what a lying server sends)."""
    server = _fresh_registry(tmp_path / "reg", pki)
    proxies: list[StallProxy] = []
    try:
        size = 4 << 20
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(size))
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()

        def client(host: str, **options: Any) -> Client:
            return Client(host, RegistryOptions(cert_dir=pki.certs, **options),
                          sleep=lambda _s: None)

        def proxy(**kwargs: Any) -> str:
            proxies.append(StallProxy(server.port, after=1 << 20, **kwargs))
            return proxies[-1].host

        def read_all(c: Client, declared: int = size) -> BlobReader:
            with cast(BlobReader, c.open_blob("r/b", digest, declared)) as reader:
                data = b"".join(iter(lambda: reader.read(1 << 20), b""))
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
            return reader

        assert client(server.host).upload_blob("r/b", blob, digest)
        for mode in ("stall", "close"):
            started = time.monotonic()
            reader = read_all(client(proxy(mode=mode), stall=1.0))
            assert reader.resumes == 1 and proxies[-1].hits == 1
            assert time.monotonic() - started < 15
        with pytest.raises(RegistryError) as info:
            read_all(client(proxy(mode="close", then_refuse=True)))
        message = str(info.value)
        assert re.search(rf"connection closed after \d+ of {size} bytes, and resuming failed: "
                         r".*connection closed by the registry$", message), message
        assert "Pool" not in message and "\n" not in message
        started = time.monotonic()
        with pytest.raises(TimedOut) as timed:
            read_all(client(proxy(mode="stall", times=-1), deadline=Deadline.after(2)))
        assert "gave up after 2 s" in str(timed.value)
        assert 1.5 < time.monotonic() - started < 8
        with pytest.raises(RegistryError) as info:
            read_all(client(server.host), size + 10)
        assert f"the registry has only {size} bytes of it" in str(info.value)
        with pytest.raises(RegistryError) as info:
            read_all(client(server.host), size - 10)
        assert f"the registry sent more than the {size - 10} bytes" in str(info.value)
    finally:
        for p in proxies:
            p.close()
        server.close()


@pytest.mark.podman
def test_short_names_resolve_from_registries_conf(
        make_site: Callable[[str], Site], pushed: dict[str, str],
        registries: dict[str, RegistryServer], tmp_path: Path) -> None:
    """An alias and a search registry, as podman-hpc #144 needs them; the image keeps the
    name it resolved to."""
    host = registries["token"].host
    conf = tmp_path / "registries.conf"
    conf.write_text(f'unqualified-search-registries = ["{host}"]\n'
                    f'[aliases]\n"sqs-aliased" = "{host}/fixtures/whiteouts"\n')
    site = make_site("short")
    env = {"CONTAINERS_REGISTRIES_CONF": str(conf)}
    aliased = site.cli("pull", "--creds", CREDS, "--no-mount", "--format", "json",
                       "sqs-aliased:gzip", env=env)
    assert json.loads(aliased.stdout)["names"] == [f"{host}/fixtures/whiteouts:gzip"]
    searched = site.cli("migrate", "--creds", CREDS, "--no-mount", "docker://fixtures/base:1",
                        env=env)
    assert f"{host}/fixtures/base:1" in searched.stdout


# --------------------------------------------------------------------------- credentials


def test_credentials_are_looked_up_in_podmans_order(tmp_path: Path) -> None:
    from squashstore.registry import auth

    def write(path: Path, auths: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"auths": {
            k: {"auth": base64.b64encode(v.encode()).decode()} for k, v in auths.items()}}))

    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    runtime_file = tmp_path / "run" / "containers" / "auth.json"
    write(home / ".docker" / "config.json", {"https://index.docker.io/v1/": "hub:1",
                                             "r.example:5000": "docker:2"})
    found = auth.find_credentials("docker.io", "library/alpine", env=env)
    assert found is not None and (found.username, found.password) == ("hub", "1")
    write(runtime_file, {"r.example:5000": "podman:3", "r.example:5000/team/app": "team:4"})
    assert auth.find_credentials("r.example:5000", "other/x", env=env) == auth.Credentials(
        "podman", "3", str(runtime_file))
    team = auth.find_credentials("r.example:5000", "team/app/sub", env=env)
    assert team is not None and team.username == "team"
    explicit = tmp_path / "explicit.json"
    write(explicit, {"r.example:5000": "explicit:5"})
    got = auth.find_credentials("r.example:5000", "x", env={**env,
                                                            "REGISTRY_AUTH_FILE": str(explicit)})
    assert got is not None and got.username == "explicit"
    got = auth.find_credentials("r.example:5000", "x", authfile=explicit, env=env)
    assert got is not None and got.username == "explicit"
    assert auth.find_credentials("elsewhere.example", "x", env=env) is None
    path = auth.store_credentials("new.example", auth.Credentials("u", "p:w"), env=env)
    assert path == runtime_file
    assert auth.find_credentials("new.example", "", env=env) == auth.Credentials(
        "u", "p:w", str(runtime_file))
    assert auth.remove_credentials("new.example", env=env)
    assert not auth.remove_credentials("new.example", env=env)
    assert auth.find_credentials("r.example:5000", "other/x", env=env) is not None


@pytest.mark.podman
def test_credentials_outside_latin1_are_sent_as_utf8(
        make_site: Callable[[str], Site], podman: Podman, pki: Pki, tmp_path: Path) -> None:
    """A user name or password outside latin-1 raised UnicodeEncodeError from requests (a
    traceback) and one inside it was sent latin-1: podman sends UTF-8, and so do we."""
    server = RegistryServer(tmp_path / "reg", pki, "htpasswd")
    try:
        user, password = "\u00fcser", "p\u00e4ssw\u00f6rd\u20ac"
        subprocess.run(["htpasswd", "-Bb", str(server.base / "htpasswd"), user, password],
                       check=True, capture_output=True)
        server.kill()
        server.start()
        site = make_site("utf8")
        login = site.cli("login", "-u", user, "-p", password, server.host)
        assert "Login Succeeded" in login.stdout
        wrong = site.cli("login", "-u", user, "-p", "\u20ac", server.host, check=False)
        _one_line_error(wrong, "wrong username or password")
        podman.run("login", "--cert-dir", str(pki.certs), "--authfile",
                   str(tmp_path / "podman-auth.json"), "-u", user, "-p", password, server.host)
    finally:
        server.close()


def test_a_damaged_auth_file_is_one_line(tmp_path: Path) -> None:
    from squashstore.registry.auth import AuthError, find_credentials

    for text in ("[" * 100_000, "{", "[]", '{"auths": {"h": {"auth": "!!"}}}'):
        path = tmp_path / "auth.json"
        path.write_text(text)
        with pytest.raises(AuthError) as info:
            find_credentials("h", "r", path, env={"HOME": str(tmp_path)})
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.podman
def test_an_expired_token_is_replaced(registries: dict[str, RegistryServer], pki: Pki,
                                      pushed: dict[str, str]) -> None:
    client = Client(registries["token"].host, RegistryOptions(cert_dir=pki.certs,
                                                              creds=CREDS))
    client._tokens["repository:fixtures/base:pull"] = "expired.garbage.token"
    data, _, digest = client.get_manifest("fixtures/base", "1")
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert client._tokens["repository:fixtures/base:pull"] != "expired.garbage.token"


@pytest.mark.podman
def test_concurrent_first_requests_share_one_token(registries: dict[str, RegistryServer],
                                                   pki: Pki, pushed: dict[str, str]) -> None:
    """Threads of one client that meet the token challenge together (parallel layer
    downloads, a lazy image's concurrent range reads) all get through: none takes the token
    another thread fetched meanwhile for a refusal of its credentials."""
    for _ in range(3):
        client = Client(registries["token"].host, RegistryOptions(cert_dir=pki.certs,
                                                                  creds=CREDS))
        start = threading.Barrier(8)
        results: list[object] = []

        def fetch(client: Client = client, start: threading.Barrier = start,
                  results: list[object] = results) -> None:
            start.wait()
            try:
                results.append(client.get_manifest("fixtures/base", "1")[2])
            except Exception as exc:  # collected: the assertion shows it
                results.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 8 and all(isinstance(r, str) and r.startswith("sha256:")
                                         for r in results), results


@pytest.mark.podman
def test_an_artifact_claiming_another_layer_is_refused(
        make_site: Callable[[str], Site], fixture_images: dict[str, str],
        registries: dict[str, RegistryServer], pki: Pki) -> None:
    """A hostile artifact: one image's config and layer claims (diff id, source) with
    another image's squash file and tar-split. pull refuses it and publishes nothing, and a
    later migrate of the claimed image makes its own layer (nothing of the artifact)."""
    host = registries["token"].host
    origin = make_site("origin")
    for name in ("base", "whiteouts"):
        _migrated_id(origin, fixture_images[name])
        origin.cli("push", "--creds", CREDS, fixture_images[name], f"{host}/evil/x:{name}")
    client = Client(host, RegistryOptions(cert_dir=pki.certs, creds=CREDS))
    claimed = json.loads(client.get_manifest("evil/x", "whiteouts")[0])
    other = json.loads(client.get_manifest("evil/x", "base")[0])
    for index in (0, 1, 2):  # the claims stay, the bytes (and their chunk digests) are base's
        claimed["layers"][index]["digest"] = other["layers"][index]["digest"]
        claimed["layers"][index]["size"] = other["layers"][index]["size"]
    body = json.dumps(claimed).encode()
    put = client.request("PUT", "/v2/evil/x/manifests/crafted", "evil/x", push=True,
                         headers={"Content-Type": claimed["mediaType"]}, data=body)
    assert put.status_code == 201, put.text

    node = make_site("node")
    proc = node.cli("pull", "--creds", CREDS, f"{host}/evil/x:crafted", check=False)
    _one_line_error(proc, "does not hold the layer it claims")
    _nothing_left(node)
    iid = _migrated_id(node, fixture_images["whiteouts"])
    assert node.store.resolve(iid).squash.read_bytes() == \
        origin.store.resolve(iid).squash.read_bytes()
    assert node.cli("verify", tls=False).returncode == 0
    # lazily pulled, the claim cannot be checked before the bytes are here; a migrate of
    # the claimed image then replaces the partial file with its own
    lazy = make_site("lazy")
    lazy.cli("pull", "--lazy", "--no-mount", "--creds", CREDS, f"{host}/evil/x:crafted")
    iid = _migrated_id(lazy, fixture_images["whiteouts"])
    assert lazy.store.resolve(iid).squash.read_bytes() == \
        origin.store.resolve(iid).squash.read_bytes()
    assert lazy.cli("verify", tls=False).returncode == 0


def test_a_tls_close_mid_blob_reads_as_the_registry_closing() -> None:
    """A peer's TLS close_notify mid-response: Debian's python 3.11.2 raises it as
    SSLZeroReturnError ("TLS/SSL connection has been closed (EOF)") where a newer 3.11 gives
    SSLEOFError; both are the registry closing the connection (the stall/cut test above
    sees the first on Debian's python)."""
    from squashstore.registry.client import describe_connection_error

    for cause in (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"),
                  ssl.SSLEOFError(8, "EOF occurred in violation of protocol")):
        exc = requests.ConnectionError("read failed")
        exc.__cause__ = cause
        assert describe_connection_error(exc) == "connection closed by the registry"
