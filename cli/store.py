"""Store commands: init, migrate, images, inspect, tag, untag, rmi, gc, verify, config.

Each is a thin layer over `squashstore.store`, `squashstore.migrate` and
`squashstore.mounts`: parse arguments, call the library, print. Squash options are parsed
here (`--compression`, `--level`, `--block-size` with K/M suffixes, `--jobs`); their defaults
favour fast container start-up on HPC nodes (zstd level 3: files far smaller than lz4's so
less is read from the parallel filesystem, and decompression still fast; 128K blocks: the
kernel's and squashfuse's natural read size).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squashstore import host, runtime, sources, tracker
from squashstore.cli.output import add_format_option, print_json, print_table
from squashstore.cli.registry import MIGRATE_ZSTD_LEVEL, add_registry_options, registry_options
from squashstore.cli.squash import add_squash_options, squash_options
from squashstore.image import Image, SquashstoreError
from squashstore.mounts import Registry
from squashstore.registry.options import RegistryOptions
from squashstore.squashfs.reader import verify_file
from squashstore.store import Store, StoreError, StoreImage

if TYPE_CHECKING:
    from squashstore.lazy import image as lazy_image

"""migrate's zstd level: see the module docstring."""


def _store(args: argparse.Namespace) -> Store:
    return Store(Path(args.store))


def _time(stamp: str | float) -> str:
    if isinstance(stamp, float):
        return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return stamp[:19].replace("T", " ")


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.3g}{unit}"
        value /= 1000
    return str(size)


# --------------------------------------------------------------------------- usage checks

def users_of(image: StoreImage, registry: Registry) -> list[str]:
    """Containers and images (of the local podman and of recorded mounts) using ``image``."""
    return tracker.image_users(image, registry, runtime.podman_graphroot())


# --------------------------------------------------------------------------- commands

def cmd_init(args: argparse.Namespace) -> int:
    store = _store(args)
    store.init()
    print(store.root)
    return 0


def _open_sources(references: list[str], platform: str | None,
                  registry: RegistryOptions | None = None) -> list[Image]:
    from squashstore.sources import open_image

    images = [open_image(ref, platform=platform, registry=registry) for ref in references]
    owners: dict[str, Image] = {}
    for image in images:
        for name in image.names:
            other = owners.setdefault(name, image)
            if other.config_digest != image.config_digest:
                raise StoreError(f"name clash: {name} names both {other.reference} and "
                                 f"{image.reference}")
    return images


def cmd_migrate(args: argparse.Namespace) -> int:
    from squashstore.migrate import migrate_image, options_json

    store = _store(args)
    options = squash_options(args, zstd_level=MIGRATE_ZSTD_LEVEL)
    images = _open_sources(args.sources, args.platform, registry_options(args))
    store.init()
    for image in images:
        result = migrate_image(store, image, options, mount=not args.no_mount,
                               backend=args.backend, progress=sys.stderr.isatty(),
                               warn=_warn)
        stats = result.metadata.get("squash", {})
        kept = stats.get("options")
        if kept is not None and kept != options_json(options):
            sys.stderr.write(f"squashstore: note: {image.reference}: its layer was already in "
                             f"the store and is kept as it was written ({_options_text(kept)})"
                             "; `squashstore rmi` it first to squash it again\n")
        print(f"{image.reference} -> {result.id[:12]} "
              f"{' '.join(result.names) or '<none>'} ({_human(result.size)} tree, "
              f"{_human(int(stats.get('bytes', 0)))} squash file)")
        if args.rm_source and result.id != image.source_id:  # not the store's own copy
            sources.remove_from_podman(image.reference)
    return 0


def _warn(line: str) -> None:
    sys.stderr.write(f"squashstore: {line}\n")


def _options_text(options: dict[str, Any]) -> str:
    level = options.get("level")
    text = str(options.get("compression", "?")) + (f" level {level}" if level is not None else "")
    return f"{text}, {int(options.get('block_size', 0)) // 1024}K blocks"


def cmd_images(args: argparse.Namespace) -> int:
    store = _store(args)
    images = store.images()
    mounted = host.mount_table()
    rows = [{**i.to_json(), "mounted": host.real_path(i.diff) in mounted,
             "lazy_status": _lazy_state(i.squash)} for i in images]
    if args.format == "json":
        print_json(rows)
        return 0
    table = []
    for row in rows:
        for name in row["names"] or ["<none>"]:
            table.append([name, row["id"][:12], _human(row["size"]), _time(row["created"]),
                          "yes" if row["mounted"] else "no"])
    print_table(["name", "image id", "size", "created", "mounted"], table)
    return 0


def _lazy_state(squash: Path) -> dict[str, Any] | None:
    """``lazy_status`` of an image not yet complete: ``{"present", "size", "source",
    "node_present"}`` (bytes of its squash file in the store, of all, where the rest is, in
    this node's ``[lazy] cache_dir``: None without one); None once complete or ordinary.
    (``lazy`` in its metadata says where a lazy pull came from, and stays.)"""
    from squashstore.lazy import paths as lazy_paths

    if not lazy_paths.is_lazy(squash):
        return None
    from squashstore.lazy import image as lazy_image  # brings requests: only when lazy

    try:
        status = lazy_image.status(squash, node_dir=_node_dir())
    except (SquashstoreError, OSError):
        return {"present": None, "size": None, "source": None,  # verify says what is wrong
                "node_present": None}
    if status is None:
        return None
    node = status.node
    return {"present": status.present, "size": status.remote.size,
            "source": status.remote.describe(),
            "node_present": None if node is None or node.problem else node.present}


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    record = Registry().record(image.diff)
    config = json.loads(store.config_of(image))
    print_json({**image.to_json(), "config": config,
                "mounted": host.is_mountpoint(image.diff),
                "lazy_status": _lazy_state(image.squash),
                "mount": record.to_json() if record else None})
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    store.add_names(image.id, (args.name,))
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    store.remove_name(image.id, args.name)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    store = _store(args)
    image = store.resolve(args.image)
    name = next((n for n in image.names if n in _candidates(args.image)), None)
    if name is not None and len(image.names) > 1:
        store.remove_name(image.id, name)
        print(f"untagged {name}")
        return 0
    registry = Registry()
    users = users_of(image, registry)
    if users and not args.force:
        raise StoreError(f"image {image.id[:12]} is in use by {len(users)} container(s) or "
                         f"image(s) ({', '.join(users[:3])}); use --force")
    if args.force:
        store.remove_image(image.id, unmount=lambda p: registry.umount(p, lazy=True))
    else:
        store.remove_image(image.id, unmount=registry.umount)
    print(f"deleted {image.id}")
    return 0


def _candidates(reference: str) -> list[str]:
    from squashstore.store import name_candidates

    try:
        return name_candidates(reference)
    except StoreError:
        return []


def cmd_gc(args: argparse.Namespace) -> int:
    store = _store(args)
    registry = Registry()
    removed = store.gc(lambda image: bool(users_of(image, registry)), unmount=registry.umount)
    for line in removed:
        print(f"removed {line}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from squashstore.lazy import image as lazy_image  # brings requests: only here

    store = _store(args)
    problems = store.verify_structure()
    images = [store.resolve(args.image)] if args.image else store.images()
    incomplete = []
    for image in images:
        try:  # a lazily pulled image: completed (digest checked) or its metadata alone
            from squashstore.lazy import image as lazy_image  # when used: it imports requests

            source = lazy_image.open_for_verify(image.squash)
            status = lazy_image.status(image.squash, check=True, node_dir=_node_dir()) \
                if source is not None else None
        except (SquashstoreError, OSError) as exc:
            problems.append(f"{image.squash}: {exc}")
            continue
        problems.extend(verify_file(image.squash, source=source))
        if status is not None:
            problems.extend(_cache_problems(image.id, status))
            node = status.node
            here = "" if node is None or node.problem else \
                f"; this node's cache {_percent(node.present, status.remote.size)}"
            incomplete.append(f"{image.id[:12]}: incomplete (lazy): "
                              f"{_percent(status.present, status.remote.size)} present, "
                              f"{_human(status.present)} of {_human(status.remote.size)} "
                              f"from {status.remote.describe()}{here}; structure checked, "
                              "file data and digest only once complete (`pull` completes "
                              "it); "
                              + ("each chunk cached re-checked against the artifact's chunk "
                                 "digests" if status.chunks_verified else
                                 "chunks unverified until complete (artifact without chunk "
                                 "digests)"))
    for line in [*problems, *incomplete]:
        print(line)
    if problems:
        raise StoreError(f"{len(problems)} problem(s) in store {store.root}")
    print(f"ok: {len(images)} image(s)"
          + (f", {len(incomplete)} of them incomplete (lazy)" if incomplete else ""))
    return 0


def _node_dir() -> Path | None:
    """This node's lazy cache directory (``[lazy] cache_dir``), None without one."""
    from squashstore import config

    return config.load().lazy.cache_path()


def _cache_problems(image: str, status: lazy_image.Status) -> list[str]:
    """What `verify` reports of a lazy image's caches: chunks whose bytes no longer match
    the artifact's chunk digests, and a node cache not used (another user's, a symlink)."""
    from squashstore.lazy.cache import CHUNK

    out = []
    for what, cache in (("its cache in the store", status.store),
                        ("this node's cache", status.node)):
        if cache is None:
            continue
        if cache.problem:
            out.append(f"image {image[:12]}: {what} is not used: {cache.problem}")
        elif cache.bad:
            out.append(f"image {image[:12]}: {what} {cache.data}: {len(cache.bad)} chunk(s) "
                       f"fail the artifact's chunk digests (the first at byte "
                       f"{cache.bad[0] * CHUNK}): the bytes changed after they were "
                       "fetched; completing the image then fails its digest and starts over")
    return out


def _percent(part: int, whole: int) -> str:
    """``37 %``; never 100 % for a part short of the whole, nor 0 % for a part above none."""
    if whole <= 0:
        return "100 %"
    share = 100 * part / whole
    if part < whole:
        share = min(share, 99.9)
    if part > 0:
        share = max(share, 0.1)
    return f"{share:.1f} %" if share < 10 or share > 99 else f"{share:.0f} %"


def mount_program_path() -> str:
    beside = Path(sys.executable).parent / "squashstore-mount-program"
    if beside.exists():
        return str(beside)
    return shutil.which("squashstore-mount-program") or str(beside)


def cmd_config(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.hooks:
        from squashstore.hook import hook_json

        print_json(hook_json())
        return 0
    print("[storage.options]")
    print(f"additionalimagestores = [{json.dumps(str(store.root))}]")
    print()
    print("[storage.options.overlay]")
    print(f"mount_program = {json.dumps(mount_program_path())}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("init", help="create an empty store podman accepts")
    p.set_defaults(func=cmd_init)

    p = subparsers.add_parser("migrate", help="squash images into the store")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    add_squash_options(p, zstd_level=MIGRATE_ZSTD_LEVEL)
    p.add_argument("--rm-source", action="store_true",
                   help="then remove the image from the local podman store")
    p.add_argument("--platform", default=None, help="os/arch[/variant] of a multi-arch source")
    p.add_argument("--backend", default=None, choices=("fuse", "kernel", "squashfuse"),
                   help="mount backend (default: [mount] backend of the config, else fuse)")
    p.add_argument("--no-mount", action="store_true", help="do not leave the image mounted")
    add_registry_options(p)
    p.set_defaults(func=cmd_migrate)

    p = subparsers.add_parser("images", help="list the store's images")
    add_format_option(p)
    p.set_defaults(func=cmd_images)

    p = subparsers.add_parser("inspect", help="one image as JSON")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("tag", help="add a name (taken from any other image)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_tag)

    p = subparsers.add_parser("untag", help="remove a name")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_untag)

    p = subparsers.add_parser("rmi", help="remove a name, or the image with its last name")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--force", action="store_true", help="even while something uses it")
    p.set_defaults(func=cmd_rmi)

    p = subparsers.add_parser("gc", help="remove leftovers and dangling images nothing uses")
    p.set_defaults(func=cmd_gc)

    p = subparsers.add_parser("verify", help="check the store and read every squash file")
    p.add_argument("image", metavar="IMAGE", nargs="?")
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("config", help="print the storage.conf lines for this store")
    p.add_argument("--hooks", action="store_true", help="print the OCI hook JSON instead")
    p.set_defaults(func=cmd_config)
