"""Registries: image names and registries.conf, the `docker://` source, login/logout, and
squashstore's own artifacts (`push`/`pull`), against a real `docker-registry` the tests
start on 127.0.0.1 (TLS with a certificate made here, htpasswd basic auth, and token auth
with a small token issuer) and with skopeo and podman as independent clients."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from squashstore import names
from squashstore.image import SourceError

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
                                 "0" * 64, "bad_host.io:x/a"])
def test_invalid_names(bad: str) -> None:
    with pytest.raises(names.InvalidName):
        names.registry_name(bad)


_component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,4})?", fullmatch=True)


@given(domain=st.sampled_from(["", "localhost/", "quay.io/", "r.example:5000/", "docker.io/"]),
       path=st.lists(_component, min_size=1, max_size=3),
       tag=st.one_of(st.just(""), st.from_regex(r":[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,10}",
                                                fullmatch=True)))
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
