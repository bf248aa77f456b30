"""Image names: the docker reference grammar, the two normalisations and short-name resolution.

This module is the one place that knows what an image name is. `parse` splits a reference
(``[DOMAIN/]PATH[:TAG][@DIGEST]``, docker's grammar: a first component is a domain when it
holds a ``.`` or a ``:`` or is ``localhost``). The two defaults are separate, explicitly named
functions: `registry_name` qualifies a name for a registry (``alpine`` ->
``docker.io/library/alpine:latest``, what podman pulls) and `local_name` qualifies a name for a
local store (``alpine`` -> ``localhost/alpine:latest``, what ``podman tag`` and squashstore's
store give an unqualified name). `registry_candidates` resolves a short name for a pull as
containers/image does it from ``registries.conf`` (`load_registries_conf`: the main file or
``$CONTAINERS_REGISTRIES_CONF``, then the ``registries.conf.d`` drop-ins): an alias from
``[aliases]`` first, else each of ``unqualified-search-registries`` in order, with
``short-name-mode`` deciding whether several candidates are tried (permissive, disabled) or
refused (enforcing: podman would prompt, and without a terminal refuses too).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from squashstore.image import SourceError

DOCKER_HUB = "docker.io"
"""The domain of an unqualified name on a registry."""
DOCKER_LIBRARY = "library"
"""The namespace Docker Hub gives a one-component path."""
LOCAL_DOMAIN = "localhost"
"""The domain of an unqualified name in a local store."""
DEFAULT_TAG = "latest"

SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
SYSTEM_REGISTRIES_CONF_DIR = Path("/etc/containers/registries.conf.d")
USER_REGISTRIES_CONF = Path(".config/containers/registries.conf")
USER_REGISTRIES_CONF_DIR = Path(".config/containers/registries.conf.d")

TAG = re.compile(r"[\w][\w.-]{0,127}")
"""A tag, as docker's reference grammar has it."""
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
                     r"(?:\.(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?))*(?::[0-9]+)?"
                     r"|\[[0-9a-fA-F:]+\](?::[0-9]+)?")


class InvalidName(SourceError):
    """A string that is not an image name."""


@dataclass(frozen=True)
class Name:
    """A parsed image name; `domain` is empty for a short name."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def is_short(self) -> bool:
        return not self.domain

    @property
    def repository(self) -> str:
        """``domain/path`` (or ``path`` for a short name)."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def reference(self) -> str:
        """What a registry's ``/manifests/`` takes: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def qualified(self, domain: str) -> Name:
        """This name in `domain` (its own domain if it has one), Docker Hub's ``library/``
        added to a one-component path there."""
        domain = self.domain or domain
        path = self.path
        if domain == DOCKER_HUB and "/" not in path:
            path = f"{DOCKER_LIBRARY}/{path}"
        return Name(domain, path, self.tag, self.digest)

    def with_default_tag(self) -> Name:
        """``:latest`` added when the name has neither tag nor digest."""
        if self.tag or self.digest:
            return self
        return Name(self.domain, self.path, DEFAULT_TAG, "")

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def parse(text: str) -> Name:
    """`text` split by docker's reference grammar; `InvalidName` when it is not one."""
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise InvalidName(f"invalid image name {text!r}: bad digest")
    tag = ""
    last = name.rfind(":")
    if last > name.rfind("/"):
        name, tag = name[:last], name[last + 1:]
        if not TAG.fullmatch(tag):
            raise InvalidName(f"invalid image name {text!r}: bad tag")
    domain, slash, path = name.partition("/")
    if not slash or not ("." in domain or ":" in domain or domain == LOCAL_DOMAIN):
        domain, path = "", name
    elif not _DOMAIN.fullmatch(domain):
        raise InvalidName(f"invalid image name {text!r}: bad registry {domain!r}")
    elif re.search(r":0*(?:[0-9]{6,}|[7-9][0-9]{4}|6[6-9][0-9]{3}|65[6-9][0-9]{2}|"
                   r"655[4-9][0-9]|6553[6-9]|0)$", domain):
        raise InvalidName(f"invalid image name {text!r}: bad registry port {domain!r} "
                          "(1-65535)")
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if not path or not all(_PATH_COMPONENT.fullmatch(p) for p in path.split("/")):
        raise InvalidName(f"invalid image name {text!r}")
    if re.fullmatch(r"[0-9a-f]{64}", path):
        raise InvalidName(f"invalid image name {text!r}: a 64-hex-digit id is not a name")
    if len(name) > 255:
        raise InvalidName(f"invalid image name {text!r}: longer than 255 characters")
    return Name(domain, path, tag, digest)


def registry_name(text: str) -> str:
    """A name as a registry client means it: ``alpine`` ->
    ``docker.io/library/alpine:latest`` (no registries.conf involved)."""
    return str(parse(text).qualified(DOCKER_HUB).with_default_tag())


def local_name(text: str) -> str:
    """A name as a local store records an unqualified one: ``x`` -> ``localhost/x:latest``;
    ``docker.io/alpine`` -> ``docker.io/library/alpine:latest``."""
    return str(parse(text).qualified(LOCAL_DOMAIN).with_default_tag())


# --- registries.conf ----------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryEntry:
    """A ``[[registry]]`` table: a prefix, where it really lives, and its flags."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False


@dataclass(frozen=True)
class RegistriesConf:
    """What squashstore uses of registries.conf (after the drop-ins are merged)."""

    search: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    mode: str = "permissive"
    registries: tuple[RegistryEntry, ...] = ()
    files: tuple[Path, ...] = ()

    def entry(self, name: str) -> RegistryEntry | None:
        """The ``[[registry]]`` with the longest prefix matching `name` (a repository)."""
        best: RegistryEntry | None = None
        for entry in self.registries:
            prefix = entry.prefix
            matches = (name == prefix or name.startswith((prefix + "/", prefix + ":"))
                       or (prefix.startswith("*.")
                           and name.split("/")[0].endswith(prefix[1:])))
            if matches and (best is None or len(prefix) > len(best.prefix)):
                best = entry
        return best


def registries_conf_files(env: dict[str, str] | None = None) -> list[Path]:
    """The registries.conf files containers/image reads, in merge order: the main file
    (``$CONTAINERS_REGISTRIES_CONF``, else the user's, else the system's), then the
    drop-ins (sorted by name; the user's directory only with no per-user main file)."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    user_file = home / USER_REGISTRIES_CONF
    dirs = [SYSTEM_REGISTRIES_CONF_DIR, home / USER_REGISTRIES_CONF_DIR]
    if env.get("CONTAINERS_REGISTRIES_CONF"):
        main = Path(env["CONTAINERS_REGISTRIES_CONF"])
    elif user_file.is_file():
        main, dirs = user_file, [home / USER_REGISTRIES_CONF_DIR]
    else:
        main = SYSTEM_REGISTRIES_CONF
    files = [main] if main.is_file() else []
    for directory in dirs:
        try:
            files += sorted(p for p in directory.iterdir()
                            if p.suffix == ".conf" and p.is_file())
        except OSError:
            continue
    return files


def load_registries_conf(env: dict[str, str] | None = None) -> RegistriesConf:
    """registries.conf as podman merges it: later files replace the search list and the
    mode, and add or replace aliases and ``[[registry]]`` prefixes."""
    search: tuple[str, ...] = ()
    aliases: dict[str, str] = {}
    mode = "permissive"
    registries: dict[str, RegistryEntry] = {}
    files = registries_conf_files(env)
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SourceError(f"{path}: cannot read registries.conf ({exc})") from exc
        value = data.get("unqualified-search-registries")
        if isinstance(value, list):
            search = tuple(str(v) for v in value)
        if isinstance(data.get("short-name-mode"), str) and data["short-name-mode"]:
            mode = data["short-name-mode"]
        table = data.get("aliases")
        if isinstance(table, dict):
            aliases.update({str(k): str(v) for k, v in table.items()})
        for item in data.get("registry") or []:
            if not isinstance(item, dict):
                continue
            location = str(item.get("location") or "")
            prefix = str(item.get("prefix") or location)
            if prefix:
                registries[prefix] = RegistryEntry(prefix, location or prefix,
                                                   bool(item.get("insecure")),
                                                   bool(item.get("blocked")))
    return RegistriesConf(search, aliases, mode, tuple(registries.values()), tuple(files))


def registry_candidates(text: str, conf: RegistriesConf, interactive: bool = False
                        ) -> list[Name]:
    """The fully qualified names a pull of `text` tries, in order, as podman resolves them:
    a qualified name as is; a short name's alias; else every search registry."""
    name = parse(text)
    if not name.is_short:
        return [name.qualified(DOCKER_HUB).with_default_tag()]
    alias = conf.aliases.get(name.path)
    if alias is not None:
        target = parse(alias)
        if name.tag or name.digest:
            target = Name(target.domain, target.path, name.tag, name.digest)
        return [target.qualified(DOCKER_HUB).with_default_tag()]
    if not conf.search:
        raise SourceError(f"short name {text!r} did not resolve to an alias and no "
                          "unqualified-search-registries are defined in "
                          f"{_files_text(conf)}: use a fully qualified name")
    candidates = [name.qualified(registry).with_default_tag() for registry in conf.search]
    if len(candidates) > 1 and conf.mode == "enforcing":
        how = "cannot prompt" if not interactive else "squashstore does not prompt"
        raise SourceError(
            f"short name {text!r} is ambiguous ({', '.join(map(str, candidates))}) and "
            f"short-name-mode is enforcing ({how}): use a fully qualified name or add an "
            "alias")
    return candidates


def _files_text(conf: RegistriesConf) -> str:
    return ", ".join(map(str, conf.files)) or "registries.conf"


def local_candidates(text: str, conf: RegistriesConf | None = None) -> list[str]:
    """The full names a short name may mean in a local store, in podman's order: its alias,
    ``localhost/``, the search registries, then Docker Hub; a qualified name as itself."""
    name = parse(text)
    if not name.is_short:
        return [str(name.qualified(DOCKER_HUB).with_default_tag())]
    out: list[str] = []
    if conf is not None and name.path in conf.aliases:
        target = parse(conf.aliases[name.path])
        if name.tag or name.digest:
            target = Name(target.domain, target.path, name.tag, name.digest)
        out.append(str(target.qualified(DOCKER_HUB).with_default_tag()))
    domains = [LOCAL_DOMAIN, *(conf.search if conf is not None else ()), DOCKER_HUB]
    out += [str(name.qualified(d).with_default_tag()) for d in domains]
    return list(dict.fromkeys(out))
