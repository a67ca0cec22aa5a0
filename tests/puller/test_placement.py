"""Safe names, staging directories and the atomic rename."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapter.errors import StorageError, UnsafePath
from puller.placement import (
    StagingDir,
    place_atomically,
    remove_tree,
    safe_join,
    safe_relpath,
    staging_dir,
    sweep_staging,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.bin", "model.bin"),
        ("a/b/c.txt", "a/b/c.txt"),
        ("a//b/./c", "a/b/c"),
        ("./a/b/", "a/b"),
        ("dir with spaces/ünïcode.txt", "dir with spaces/ünïcode.txt"),
        ("a/..b/c..", "a/..b/c.."),
    ],
)
def test_safe_relpath_normalises(name: str, expected: str) -> None:
    assert safe_relpath(name) == expected


@pytest.mark.parametrize(
    "name",
    ["", "/etc/passwd", "../x", "a/../../x", "a/..", "..", "a\\b", "..\\..\\x", "a\x00b", ".", "./", "//"],
)
def test_safe_relpath_refuses(name: str) -> None:
    with pytest.raises(UnsafePath) as info:
        safe_relpath(name)
    if name:
        assert repr(name) in str(info.value)


def test_safe_join_stays_inside(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b") == tmp_path / "a" / "b"
    with pytest.raises(UnsafePath):
        safe_join(tmp_path, "a/../../b")


def test_safe_join_refuses_a_link_leading_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    with pytest.raises(UnsafePath, match="escape"):
        safe_join(root, "escape/file.txt")
    # a link that stays inside the root is fine
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner")
    assert safe_join(root, "alias/file.txt") == root / "alias" / "file.txt"


def test_staging_dir_lives_under_tmp_and_is_removed(tmp_path: Path) -> None:
    with staging_dir(tmp_path, "mnist__isvc-1") as staging:
        assert staging.path.parent == tmp_path / "_tmp"
        assert staging.path.name.startswith("mnist__isvc-1.")
        (staging.path / "sub").mkdir()
        (staging.path / "sub" / "f").write_bytes(b"x")
    assert not staging.path.exists()
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_staging_dir_beside_a_destination(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path / "unused", "dest", parent=tmp_path)
    assert staging.path.parent == tmp_path
    assert staging.path.name.startswith(".dest.")
    staging.remove()
    assert not (tmp_path / "unused").exists()


def test_place_atomically_new_target(tmp_path: Path) -> None:
    staging = StagingDir(tmp_path)
    (staging.path / "model.bin").write_bytes(b"new")
    target = tmp_path / "m1"
    place_atomically(staging.path, target)
    assert (target / "model.bin").read_bytes() == b"new"
    assert not staging.path.exists()
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_place_atomically_replaces_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "m1"
    (target / "old").mkdir(parents=True)
    (target / "old" / "weights").write_bytes(b"old")
    staging = StagingDir(tmp_path)
    (staging.path / "model.bin").write_bytes(b"new")
    place_atomically(staging.path, target)
    assert sorted(p.name for p in target.iterdir()) == ["model.bin"]
    assert list((tmp_path / "_tmp").iterdir()) == [], "the old model must be deleted"


def test_place_atomically_replaces_a_link_without_following_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    target = tmp_path / "models" / "m1"
    target.parent.mkdir()
    target.symlink_to(outside)
    staging = StagingDir(tmp_path / "models")
    (staging.path / "f").write_bytes(b"new")
    place_atomically(staging.path, target)
    assert not target.is_symlink()
    assert (target / "f").read_bytes() == b"new"
    assert (outside / "keep").read_bytes() == b"keep"


def test_place_atomically_failure_removes_staging_and_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "m1"
    target.mkdir()
    (target / "old").write_bytes(b"old")
    staging = StagingDir(tmp_path)
    (staging.path / "f").write_bytes(b"new")
    # the target's parent does not exist: the rename fails
    missing_parent = tmp_path / "no-such-parent" / "m1"
    with pytest.raises(StorageError, match="placing the model"):
        place_atomically(staging.path, missing_parent)
    assert not staging.path.exists()
    assert not missing_parent.exists()

    # the final rename fails after the old one was moved aside: it is put back
    ghost = tmp_path / "_tmp" / "never-created"
    with pytest.raises(StorageError):
        place_atomically(ghost, target)
    assert (target / "old").read_bytes() == b"old"
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_sweep_staging_removes_leftovers(tmp_path: Path) -> None:
    assert sweep_staging(tmp_path) == []
    leftover = StagingDir(tmp_path, "a")
    (leftover.path / "partial").write_bytes(b"x" * 10)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (tmp_path / "_tmp" / "link").symlink_to(outside)
    removed = sweep_staging(tmp_path)
    assert sorted(removed) == sorted([leftover.path.name, "link"])
    assert list((tmp_path / "_tmp").iterdir()) == []
    assert (outside / "keep").exists(), "a link is removed, never followed"


def test_remove_tree_never_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    model = tmp_path / "model"
    model.mkdir()
    (model / "link").symlink_to(outside)
    (model / "file").write_bytes(b"x")
    remove_tree(model)
    assert not model.exists()
    assert (outside / "keep").exists()
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert not os.path.lexists(link)
    assert (outside / "keep").exists()
    remove_tree(tmp_path / "absent")  # no error


def test_remove_tree_deletes_nested_folders_and_every_kind_of_entry(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep").write_bytes(b"keep")
    model = tmp_path / "model"
    deep = model.joinpath(*["d"] * 40)  # deeper than the descriptor walk goes alone
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"x")
    (model / "d" / "dangling").symlink_to(tmp_path / "nowhere")
    (model / "d" / "to-folder").symlink_to(outside / "sub")
    (model / "empty").mkdir()
    os.mkfifo(model / "fifo")
    remove_tree(model)
    assert not os.path.lexists(model)
    assert (outside / "sub" / "keep").read_bytes() == b"keep"


def test_remove_tree_of_a_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    remove_tree(target)
    assert not target.exists()


def test_staging_dir_makes_tmp_again_when_it_is_gone(tmp_path: Path) -> None:
    first = staging_dir(tmp_path, "a")
    first.remove()
    (tmp_path / "_tmp").rmdir()
    again = staging_dir(tmp_path, "b")
    assert again.path.parent == tmp_path / "_tmp"
    assert again.path.is_dir()
