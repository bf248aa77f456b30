"""podman's on-disk store format: big-data names as podman writes them, records, chains.

The naming rule is pinned twice: against the files a real podman (the hermetic harness)
writes for the keys of an image it imported (``manifest``, ``manifest-sha256:...``,
``sha256:...``), and against containers/storage's ``makeBigDataBaseName`` for keys with
capitals, ``-`` and ``_``, which podman files under ``=`` + base64 where squashstore 0.1
kept them plain (those are still read, and `verify` says where they are).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import MakePodman

from squashstore import podmanstore
from squashstore.podmanstore import LayerRecord, Layout, PodmanStoreError
from squashstore.store import Store


def _b64(key: str) -> str:
    return "=" + base64.standard_b64encode(key.encode()).decode()


@pytest.mark.podman
def test_big_data_names_are_the_files_podman_writes(make_podman: MakePodman,
                                                    tmp_path: Path) -> None:
    p = make_podman()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    (tmp_path / "layer.tar").write_bytes(buf.getvalue())
    image_id = p.import_tar(tmp_path / "layer.tar", "localhost/naming:1")
    layout = Layout(p.graphroot)
    [record] = podmanstore.images(layout.images_json)
    assert record.id == image_id and record.names == ("localhost/naming:1",)
    keys = record.big_data_names
    digest_keyed = [k for k in keys if k.startswith("manifest-sha256:")]
    assert digest_keyed, keys                      # a digest-keyed manifest, as podman keeps
    assert "sha256:" + image_id in keys            # the config
    files = set(os.listdir(layout.image_dir(image_id)))
    assert {podmanstore.big_data_name(k) for k in keys} == files
    assert podmanstore.big_data_name(digest_keyed[0]) == _b64(digest_keyed[0])
    for key in keys:
        data = podmanstore.read_big_data(layout.image_dir(image_id), key)
        assert data is not None
        assert "sha256:" + hashlib.sha256(data).hexdigest() == record.big_data_digests[key]


@pytest.mark.parametrize(("key", "name"), [
    ("manifest", "manifest"),
    ("0.9.az", "0.9.az"),
    ("", ""),
    ("Manifest", "=TWFuaWZlc3Q="),
    ("signature-1", "=c2lnbmF0dXJlLTE="),
    ("big_data", "=YmlnX2RhdGE="),
    ("sha256:ab", "=c2hhMjU2OmFi"),
    ("=x", "=PXg="),
    ("caf\u00e9", "=Y2Fmw6k="),
])
def test_big_data_name_is_make_big_data_base_name(key: str, name: str) -> None:
    assert podmanstore.big_data_name(key) == name


def test_old_plain_names_are_still_read(tmp_path: Path) -> None:
    for key in ("Sig-1", "big_data", "manifest"):
        assert podmanstore.legacy_big_data_name(key) == key
        (tmp_path / key).write_bytes(key.encode())
        assert podmanstore.read_big_data(tmp_path, key) == key.encode()
    (tmp_path / podmanstore.big_data_name("Sig-1")).write_bytes(b"new")
    assert podmanstore.read_big_data(tmp_path, "Sig-1") == b"new"   # podman's name first
    assert podmanstore.read_big_data(tmp_path, "missing") is None


def test_verify_says_where_an_old_name_is(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    iid = "a" * 64
    (store.images_dir / iid).mkdir()
    (store.images_dir / iid / "Sig-1").write_bytes(b"sig")
    digest = "sha256:" + hashlib.sha256(b"sig").hexdigest()
    store.images_json.write_text(json.dumps(
        [{"id": iid, "layer": "b" * 64, "big-data-digests": {"Sig-1": digest}}]))
    problems = store.verify_structure()
    assert any("Sig-1: in Sig-1, squashstore 0.1's file name, where podman does not look"
               f" (podman's is {_b64('Sig-1')})" in p for p in problems), problems


@pytest.mark.parametrize(("text", "message"), [
    ("{", "is not valid JSON"),
    ('{"id": "x"}', "is not a JSON array"),
    ('[{"id": 1}]', r"damaged \(not an array of records with ids\)"),
    ('["x"]', "damaged"),
])
def test_one_error_policy_for_record_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "layers.json"
    path.write_text(text)
    with pytest.raises(PodmanStoreError, match=message):
        podmanstore.layers(path)


def test_missing_and_empty_record_files_have_no_records(tmp_path: Path) -> None:
    assert podmanstore.images(tmp_path / "images.json") == []
    (tmp_path / "images.json").write_text("\n")
    assert podmanstore.images(tmp_path / "images.json") == []


def test_records_are_typed_and_keep_their_json(tmp_path: Path) -> None:
    raw = {"id": "l2", "parent": "l1", "diff-digest": "sha256:00", "diff-size": 12,
           "future-field": [1]}
    (tmp_path / "layers.json").write_text(json.dumps([raw, {"id": "l1", "diff-size": "x"}]))
    top, bottom = podmanstore.layers(tmp_path / "layers.json")
    assert top == LayerRecord("l2", "l1", "sha256:00", 12)
    assert top.raw == raw and bottom.diff_size == -1 and bottom.parent == ""


def test_layer_chain_and_ancestors() -> None:
    records = {r.id: r for r in (LayerRecord("c", "b"), LayerRecord("b", "a"),
                                 LayerRecord("a"))}
    assert [r.id for r in podmanstore.layer_chain("c", records)] == ["a", "b", "c"]
    assert podmanstore.ancestors("c", podmanstore.parents(records.values())) == ["c", "b", "a"]
    assert podmanstore.children(records.values(), "a") == ["b"]
    with pytest.raises(PodmanStoreError, match="layer x is missing"):
        podmanstore.layer_chain("x", records)
    loop = {"a": LayerRecord("a", "b"), "b": LayerRecord("b", "a")}
    with pytest.raises(PodmanStoreError, match="a loop"):
        podmanstore.layer_chain("a", loop)
    assert podmanstore.ancestors("a", {"a": "b", "b": "a"}) == ["a", "b"]
    # Another store's layer ends the walk quietly (the tracker reads one store at a time).
    assert podmanstore.ancestors("a", {"a": "elsewhere"}) == ["a", "elsewhere"]


def test_deeply_nested_record_file_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "images.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PodmanStoreError, match="not valid JSON"):
        podmanstore.images(path)


def test_records_written_back_keep_unmodelled_fields_in_place() -> None:
    raw = {"id": "i", "digest": "sha256:aa", "names": ["a"], "names-history": ["a", "old"],
           "layer": "l", "future": {"x": [1]}, "big-data-names": ["manifest"]}
    record = podmanstore.ImageRecord.parse(raw)
    assert record.to_json() == raw and list(record.to_json()) == list(raw)
    renamed = record.replace(names=("a", "b")).to_json()
    assert list(renamed) == list(raw) and renamed["names"] == ["a", "b"]
    assert renamed["future"] == {"x": [1]} and renamed["names-history"] == ["a", "old"]
    # A field podman left out stays out unless it is set.
    assert "digests" not in renamed
    assert record.replace(digests=("sha256:bb",)).to_json()["digests"] == ["sha256:bb"]
    layer = podmanstore.new_layer_record("l", "2024-01-01T00:00:00Z", "sha256:cc", 5)
    assert list(layer.to_json()) == ["id", "created", "compressed-diff-digest",
                                     "compressed-size", "diff-digest", "diff-size",
                                     "compression"]
    assert LayerRecord.parse(layer.to_json()) == layer and layer.diff_size == 5
