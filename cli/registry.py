"""Registry commands: `login`, `logout`, `push IMAGE REF`, `pull REF`, and the registry
options (``--tls-verify``, ``--authfile``, ``--cert-dir``, ``--creds``, ``--timeout``) that
`migrate`, `squash` and `export` also take for a ``docker://`` SOURCE.

`push` uploads a store image as squashstore's artifact (docs/artifact-format.md); `pull`
installs such an artifact without converting, or migrates an ordinary image from the
registry (podman-hpc's ``pull``). Progress lines go to stderr on terminals only.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from squashstore import names
from squashstore.cli.output import add_format_option, print_json, seconds
from squashstore.cli.squash import add_squash_options, squash_options
from squashstore.image import SquashstoreError
from squashstore.progress import Transfer, human
from squashstore.registry.options import Deadline, RegistryOptions

MIGRATE_ZSTD_LEVEL = 3
"""The zstd level of migrate and of pull for an ordinary image (`cli/store.py` uses it too)."""


class RegistryUsageError(SquashstoreError):
    """Arguments of a registry command that do not fit together."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_registry_options(parser: argparse.ArgumentParser) -> None:
    """The registry options of cli.md, spelled as podman spells them."""
    group = parser.add_argument_group("registry options (docker:// references)")
    group.add_argument("--tls-verify", type=_bool, nargs="?", const=True, default=None,
                       metavar="BOOL", help="verify the registry's TLS certificate "
                       "(default: true, unless registries.conf marks it insecure)")
    group.add_argument("--authfile", type=Path, default=None, metavar="FILE",
                       help="credentials file (default: $REGISTRY_AUTH_FILE, else "
                       "${XDG_RUNTIME_DIR}/containers/auth.json, then ~/.docker/config.json)")
    group.add_argument("--cert-dir", type=Path, default=None, metavar="DIR",
                       help="CA certificates (*.crt) and client keys (*.cert, *.key) "
                       "instead of /etc/containers/certs.d/HOST:PORT")
    group.add_argument("--creds", default=None, metavar="USER:PASS",
                       help="credentials for this command only")
    group.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                       help="give up when the registry transfers are not done SECONDS after "
                       "the command started (default: [registry] timeout of the config; "
                       "0: no limit)")


def registry_options(args: argparse.Namespace) -> RegistryOptions:
    """The registry options of `args`; the deadline counts from the first call."""
    deadline = getattr(args, "registry_deadline", None)
    if deadline is None:
        from squashstore import config

        seconds = getattr(args, "timeout", None)
        if seconds is None:
            seconds = config.load().registry.timeout
        deadline = Deadline.after(seconds) if seconds else False
        args.registry_deadline = deadline
    return RegistryOptions(tls_verify=getattr(args, "tls_verify", None),
                           authfile=getattr(args, "authfile", None),
                           cert_dir=getattr(args, "cert_dir", None),
                           creds=getattr(args, "creds", None),
                           deadline=deadline if isinstance(deadline, Deadline) else None)


def register(sub: Any) -> None:
    p = sub.add_parser("login", help="store registry credentials in podman's auth file",
                       description="Check the credentials with the registry and record them "
                       "where `podman login` does, so both tools share them.")
    p.add_argument("registry", nargs="?", metavar="REGISTRY",
                   help="HOST[:PORT] or HOST/NAMESPACE (default: the first "
                   "unqualified-search registry)")
    p.add_argument("-u", "--username", default=None)
    p.add_argument("-p", "--password", default=None)
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_registry_options(p)
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="remove registry credentials from podman's auth file")
    p.add_argument("registry", nargs="?", metavar="REGISTRY")
    p.add_argument("-a", "--all", action="store_true", help="remove every credential")
    p.add_argument("--authfile", type=Path, default=None, metavar="FILE")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser("push", help="upload a store image as a squashstore OCI artifact",
                       description="Upload IMAGE's squash file, tar-split and config as "
                       "one OCI artifact (docs/artifact-format.md) that `pull` installs "
                       "without converting.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REF", help="[docker://|oras://]HOST[:PORT]/REPO[:TAG]")
    add_registry_options(p)
    add_format_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the digest")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="install a squashstore artifact, or migrate an image "
                       "from a registry",
                       description="A squashstore artifact is installed as it is (verified, "
                       "same image id); an ordinary image is migrated from docker://REF.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--lazy", action="store_true",
                   help="install a squashstore artifact at once and fetch its squash file's "
                   "blocks from the registry as they are read (a later pull completes it)")
    p.add_argument("--background", action="store_true",
                   help="complete a lazily pulled image (with --lazy: the one just installed) "
                   "in a detached process instead of in front")
    p.add_argument("--platform", default=None, help="os/arch[/variant] of a multi-arch image")
    p.add_argument("--backend", default=None, choices=("fuse", "kernel", "squashfuse"),
                   help="mount backend (default: [mount] backend of the config, else fuse)")
    p.add_argument("--no-mount", action="store_true", help="do not leave the image mounted")
    add_squash_options(p, zstd_level=MIGRATE_ZSTD_LEVEL)
    add_registry_options(p)
    add_format_option(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the image id")
    p.set_defaults(func=cmd_pull)


# --------------------------------------------------------------------------- login/logout


def _login_key(registry: str | None) -> str:
    if registry:
        key = registry.removeprefix("docker://").removeprefix("https://").rstrip("/")
        return "docker.io" if key in ("index.docker.io", "registry-1.docker.io") else key
    conf = names.load_registries_conf()
    if not conf.search:
        raise RegistryUsageError("login: no REGISTRY given and no unqualified-search "
                                 "registries in registries.conf")
    return conf.search[0]


def cmd_login(args: argparse.Namespace) -> int:
    from squashstore.registry.auth import Credentials, store_credentials
    from squashstore.registry.client import Client

    key = _login_key(args.registry)
    user, password = args.username, args.password
    if args.creds:
        user, _, password = args.creds.partition(":")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if not user:
        if not sys.stdin.isatty():
            raise RegistryUsageError("login: give -u USER (no terminal to ask on)")
        user = input("Username: ")
    if password is None:
        if not sys.stdin.isatty():
            raise RegistryUsageError("login: give -p, --password-stdin or --creds "
                                     "(no terminal to ask on)")
        password = getpass.getpass("Password: ")
    host = key.split("/", 1)[0]
    options = dataclasses.replace(registry_options(args), creds=f"{user}:{password}")
    with Client(host, options) as client:
        client.check_login()
    path = store_credentials(key, Credentials(user, password), args.authfile)
    sys.stderr.write(f"credentials for {key} stored in {path}\n")
    print("Login Succeeded!")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from squashstore.registry.auth import (
        primary_auth_file,
        remove_all_credentials,
        remove_credentials,
    )

    if args.all:
        remove_all_credentials(args.authfile)
        print("Removed login credentials for all registries")
        return 0
    key = _login_key(args.registry)
    if not remove_credentials(key, args.authfile):
        raise SquashstoreError(f"not logged into {key} (in {primary_auth_file(args.authfile)})")
    print(f"Removed login credentials for {key}")
    return 0


# --------------------------------------------------------------------------- push/pull


def _transfer(enabled: bool) -> Callable[[str, int], tuple[Callable[[int], None] | None,
                                                            Callable[[], None]]]:
    def make(label: str, total: int) -> tuple[Callable[[int], None] | None, Callable[[], None]]:
        if not enabled:
            return None, lambda: None
        bar = Transfer(label, total)
        return bar.update, bar.done
    return make


def cmd_push(args: argparse.Namespace) -> int:
    from squashstore.registry.artifact import plan_push
    from squashstore.registry.client import Client
    from squashstore.registry.docker import parse_docker_reference
    from squashstore.store import Store

    store = Store(Path(args.store))
    image = store.resolve(args.image)
    ref = parse_docker_reference(args.ref)[0]
    if ref.name.digest:
        raise RegistryUsageError("push: REF needs a tag, not a digest")
    bars = _transfer(sys.stderr.isatty() and not args.quiet)
    _complete_lazy(image.squash, lambda label: None,  # a lazy image's file has holes
                   registry_options(args))
    size = image.squash.stat().st_size if image.squash.is_file() else -1
    update, done = bars("hashing squash file", size)
    plan = plan_push(store, image, update)
    done()
    uploaded: list[str] = []
    with Client(ref.host, registry_options(args)) as client:
        update, done = bars("upload squash file", size)
        if client.upload_blob(ref.repository, plan.squash, plan.squash_digest, update):
            uploaded.append(plan.squash_digest)
        done()
        if plan.tar_split is not None and client.upload_blob(
                ref.repository, plan.tar_split, plan.tar_split_digest):
            uploaded.append(plan.tar_split_digest)
        if plan.prefetch is not None:
            from squashstore.blobs import digest_bytes

            client.upload_bytes(ref.repository, plan.prefetch, digest_bytes(plan.prefetch))
        if plan.chunk_digests:
            from squashstore.blobs import digest_bytes

            client.upload_bytes(ref.repository, plan.chunk_digests,
                                digest_bytes(plan.chunk_digests))
        client.upload_bytes(ref.repository, plan.config, "sha256:" + image.id)
        client.put_manifest(ref.repository, ref.reference, plan.manifest,
                            "application/vnd.oci.image.manifest.v1+json")
    from squashstore.registry.artifact import manifest_digest

    digest = manifest_digest(plan.manifest)
    if args.quiet:
        print(digest)
    elif args.format == "json":
        print_json({"id": image.id, "reference": ref.text, "digest": digest,
                    "uploaded": uploaded, "squash_bytes": size})
    else:
        skipped = "" if plan.squash_digest in uploaded else " (squash file already there)"
        print(f"{image.id[:12]} -> {ref.text}@{digest} ({human(size)} squash file){skipped}")
    return 0


def _complete_lazy(squash: Path, progress: Callable[[str], Callable[[int], None] | None],
                   options: RegistryOptions) -> int:
    """Finish a lazily pulled image (`pull REF` of one) under the command's deadline and
    stall limit (`options`); the bytes it fetched."""
    from squashstore.lazy import image as lazy_image
    from squashstore.lazy import paths as lazy_paths
    from squashstore.lazy import remote

    status = lazy_image.status(squash) if lazy_paths.is_lazy(squash) else None
    if status is None:
        return 0
    lazy_image.complete(squash, lambda r: remote.open_source(r, options),
                        progress("complete squash file"))
    return status.remote.size - status.present


def _prefetch_list(client: Any, repository: str, parsed: Any, what: str) -> Any:
    """The artifact's start-up prefetch list (`squashstore.lazy.prefetch`), checked to be
    about its squash file; None when it has none (or one of a later format)."""
    from squashstore.lazy import prefetch

    if parsed.prefetch is None:
        return None
    data = client.read_blob(repository, parsed.prefetch, prefetch.LIMIT)
    listed = prefetch.parse(data, f"{what}: prefetch list")
    if listed is None:
        return None
    return prefetch.for_squash(listed, parsed.squash.digest, parsed.squash.size, what)


def _chunk_digests(client: Any, repository: str, parsed: Any, what: str) -> Any:
    """The artifact's per-chunk digests (`squashstore.lazy.chunkdigests`), checked to be of
    its squash file in the lazy cache's chunks; None when it has none (pushed before them:
    its chunks are then unverified until the image completes)."""
    from squashstore.lazy import chunkdigests
    from squashstore.lazy.image import check_size

    check_size(parsed.squash.size, what)  # the list's limit follows the size claimed
    if parsed.chunk_digests is None:
        return None
    data = client.read_blob(repository, parsed.chunk_digests,
                            chunkdigests.limit(parsed.squash.size))
    listed = chunkdigests.parse(data, f"{what}: chunk digests")
    return chunkdigests.for_squash(listed, parsed.squash.digest, parsed.squash.size, what)


def _keep_prefetch_list(squash: Path, listed: Any) -> None:
    """Keep a pulled prefetch list in the store (a later push sends it on), unless the
    store has one of its own for that squash file."""
    from squashstore.lazy import prefetch

    if listed is None or prefetch.store_path(squash).exists():
        return
    prefetch.save(squash, listed)


def _complete_in_background(squash: Path) -> tuple[int, Path] | None:
    """Start completing a lazy image in a detached process; None when it is not lazy."""
    from squashstore.lazy import background
    from squashstore.lazy import paths as lazy_paths

    return background.spawn(squash) if lazy_paths.is_lazy(squash) else None


def cmd_pull(args: argparse.Namespace) -> int:
    from squashstore.migrate import migrate_image
    from squashstore.mounts import Registry
    from squashstore.registry import artifact
    from squashstore.registry.docker import CONFIG_LIMIT, fetch_manifest, image_from_manifest
    from squashstore.store import Store

    store = Store(Path(args.store))
    registry = Registry()
    show = sys.stderr.isatty() and not args.quiet
    client, ref, data, media_type, digest = fetch_manifest(args.ref, registry_options(args))
    with client:
        if artifact.is_artifact(data):
            what = f"docker://{ref.text}"
            parsed = artifact.parse_artifact(data, what)
            config = client.read_blob(ref.repository, parsed.config, CONFIG_LIMIT)
            name = ref.text if not ref.name.digest else f"{ref.name.repository}@{digest}"
            bars = _transfer(show)
            current: list[Callable[[], None]] = []

            def progress(label: str) -> Callable[[int], None] | None:
                update, done = bars(label, parsed.squash.size)
                current.append(done)
                return update

            downloaded_lazily = 0
            background: tuple[int, Path] | None = None
            listed = _prefetch_list(client, ref.repository, parsed, what)
            try:
                if args.lazy:
                    from squashstore.lazy.install import install_lazy

                    digests = _chunk_digests(client, ref.repository, parsed, what)
                    installed = install_lazy(store, parsed, config, client, ref.repository,
                                             registry_options(args), (name,), what, digest,
                                             registry.umount,
                                             listed.spans if listed is not None else (),
                                             digests)
                else:
                    installed = artifact.install(
                        store, parsed, config,
                        lambda d: client.open_blob(ref.repository, d.digest, d.size),
                        (name,), what, digest, registry.umount, progress)
                    if not args.background:
                        downloaded_lazily = _complete_lazy(installed.image.squash, progress,
                                                           registry_options(args))
                if args.background:
                    background = _complete_in_background(installed.image.squash)
            finally:
                for done in current:
                    done()
            result, downloaded, kind = installed.image, installed.downloaded, "artifact"
            _keep_prefetch_list(result.squash, listed)
            if not args.lazy:
                downloaded += downloaded_lazily
            if not args.no_mount:
                registry.ensure_mounted(result.id, result.layer, result.squash, result.diff,
                                        backend=args.backend)
        else:
            if args.lazy or args.background:
                raise RegistryUsageError(f"{ref.text}: not a squashstore artifact: only a "
                                         "pushed squash file can be pulled --lazy or "
                                         "completed --background")
            wanted = None
            if args.platform:
                from squashstore import oci

                wanted = oci.parse_platform(args.platform)
            image = image_from_manifest(client, ref, data, media_type, digest, wanted,
                                        args.ref)
            result = migrate_image(store, image, squash_options(args, MIGRATE_ZSTD_LEVEL),
                                   mount=not args.no_mount, backend=args.backend,
                                   progress=show)
            downloaded, kind, background = -1, "image", None
    if args.quiet:
        print(result.id)
    elif args.format == "json":
        print_json({"id": result.id, "names": list(result.names), "reference": ref.text,
                    "digest": digest, "kind": kind, "downloaded": downloaded,
                    "lazy": bool(args.lazy and kind == "artifact"),
                    "background": {"pid": background[0], "log": str(background[1])}
                    if background is not None else None})
    else:
        how = "installed" if kind == "artifact" else "migrated"
        how = "installed lazily" if args.lazy and kind == "artifact" else how
        if background is not None:
            how += f"; completing in the background (pid {background[0]}, log {background[1]})"
        print(f"{ref.text} -> {result.id[:12]} {' '.join(result.names) or '<none>'} ({how})")
    return 0
