"""Registry credentials as podman keeps them: its auth file first, then docker's config.

The lookup order is containers/image's: ``--authfile`` (else ``$REGISTRY_AUTH_FILE``, else
``${XDG_RUNTIME_DIR}/containers/auth.json``, else ``/run/containers/UID/auth.json``), then
``$XDG_CONFIG_HOME/containers/auth.json``, then ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``). In each file a key may be a host (``HOST[:PORT]``), a
namespace (``HOST/REPO``, the longest match wins) or docker's ``https://HOST/v1/`` form.
`store_credentials`/`remove_credentials` edit the first file the way ``podman login`` and
``podman logout`` do (``{"auths": {KEY: {"auth": base64("user:password")}}}``, mode 0600,
written atomically), so both tools share one login.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squashstore.atomic import atomic_output
from squashstore.image import SquashstoreError


class AuthError(SquashstoreError):
    """Credentials could not be read, written or were refused."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str = ""
    """Where they came from (a file, ``--creds``), for error messages."""


def primary_auth_file(authfile: Path | None = None, env: dict[str, str] | None = None) -> Path:
    """The auth file podman reads first and `podman login` writes."""
    env = dict(os.environ) if env is None else env
    if authfile is not None:
        return authfile
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
    return Path(f"/run/containers/{os.getuid()}/auth.json")


def auth_files(authfile: Path | None = None, env: dict[str, str] | None = None) -> list[Path]:
    """Every file credentials are looked up in, in containers/image's order."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME") or Path.home())
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    docker = Path(env["DOCKER_CONFIG"]) / "config.json" if env.get("DOCKER_CONFIG") else \
        home / ".docker" / "config.json"
    files = [primary_auth_file(authfile, env), config_home / "containers" / "auth.json", docker]
    return list(dict.fromkeys(files))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise AuthError(f"{path}: cannot read the auth file: {exc.strerror}") from exc
    if not data.strip():
        return {}
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise AuthError(f"{path}: the auth file is not valid JSON ({exc})") from exc
    except RecursionError:
        raise AuthError(f"{path}: the auth file is not valid JSON (nested too deeply)") \
            from None
    if not isinstance(value, dict):
        raise AuthError(f"{path}: the auth file is not a JSON object")
    return value


def _key_host(key: str) -> str:
    """docker's ``https://index.docker.io/v1/`` keys, reduced to podman's form."""
    key = key.removeprefix("https://").removeprefix("http://")
    if key.endswith("/v1/") or key.endswith("/v2/") or key.endswith("/v1") or \
            key.endswith("/v2"):
        key = key.rsplit("/", 2 if key.endswith("/") else 1)[0]
    if key in ("index.docker.io", "registry-1.docker.io"):
        key = "docker.io"
    return key.rstrip("/")


def _decode(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            text = base64.b64decode(auth, validate=False).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise AuthError(f"{where}: an \"auth\" entry is not base64 of user:password") \
                from exc
        user, sep, password = text.partition(":")
        if not sep:
            raise AuthError(f"{where}: an \"auth\" entry is not base64 of user:password")
        return Credentials(user, password, where)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret, where)
    return None


def find_credentials(host: str, repository: str = "", authfile: Path | None = None,
                     env: dict[str, str] | None = None) -> Credentials | None:
    """The credentials for `repository` (``path``) on `host`, or None (anonymous)."""
    wanted = [f"{host}/{repository}"] if repository else []
    parts = repository.split("/")
    wanted += [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    wanted.append(host)
    for path in auth_files(authfile, env):
        auths = _read(path).get("auths")
        if not isinstance(auths, dict):
            continue
        entries = {_key_host(str(k)): v for k, v in auths.items()}
        for key in wanted:
            found = _decode(entries.get(key), str(path))
            if found is not None:
                return found
    return None


def _write(path: Path, value: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_output(path, mode=0o600, durable=True) as out:
            out.write(json.dumps(value, indent="\t").encode() + b"\n")
    except OSError as exc:
        raise AuthError(f"{path}: cannot write the auth file: {exc.strerror}") from exc


def store_credentials(key: str, credentials: Credentials, authfile: Path | None = None,
                      env: dict[str, str] | None = None) -> Path:
    """Record `credentials` for `key` (a host or host/namespace) as ``podman login`` does."""
    path = primary_auth_file(authfile, env)
    value = _read(path)
    auths = value.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode())
    auths[key] = {"auth": token.decode()}
    value["auths"] = auths
    _write(path, value)
    return path


def remove_credentials(key: str, authfile: Path | None = None,
                       env: dict[str, str] | None = None) -> bool:
    """Forget `key`'s credentials in the primary auth file; False when there were none."""
    path = primary_auth_file(authfile, env)
    value = _read(path)
    auths = value.get("auths")
    if not isinstance(auths, dict):
        return False
    matching = [k for k in auths if _key_host(str(k)) == key]
    if not matching:
        return False
    for k in matching:
        del auths[k]
    _write(path, value)
    return True


def remove_all_credentials(authfile: Path | None = None,
                           env: dict[str, str] | None = None) -> None:
    """``logout --all``: the primary auth file without any credentials."""
    path = primary_auth_file(authfile, env)
    with contextlib.suppress(FileNotFoundError):
        value = _read(path)
        value["auths"] = {}
        _write(path, value)


def parse_creds(text: str) -> Credentials:
    """``--creds USER[:PASSWORD]``."""
    user, _, password = text.partition(":")
    if not user:
        raise AuthError("--creds: needs USER:PASSWORD")
    return Credentials(user, password, "--creds")
