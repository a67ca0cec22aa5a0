"""Property tests of image layer application (``puller.layers.apply_layers``) against
hostile images built by hypothesis: one to three layers (plain, gzip or zstd tars, and
raw layers whose path is hostile), each holding the hostile entries of
``test_hostile_archives`` plus whiteouts (``.wh.<name>``, ``.wh..wh..opq``, and ones
that name ``.``, ``..`` or AUFS bookkeeping) that try to delete outside the image,
hard links to files of lower layers, and links that only escape once the layers merge;
with the whole image kept or only a subtree (including hostile subtrees), and with the
content cache off and on (a second pull then builds the image from cache links).

Properties: nothing outside the destination (and the cache) changes; a successful
apply leaves only regular files, folders and links that resolve inside the
destination, no setuid bits, no file linked from outside; a failed one raises one of
our own errors (an ``InvalidRequest`` or ``StorageError``) and leaves the destination
empty. The example-based cases are in ``tests/puller/test_layers.py``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from adapter.errors import InvalidRequest, SidecarError, StorageError
from puller.cache import ContentCache
from puller.config import StorageConfig
from puller.layers import apply_layers
from puller.metrics import PullMetrics
from puller.storage.base import Blob, Plan
from tests.faults.test_hostile_archives import (
    FUZZ,
    Sandbox,
    TarMember,
    assert_contained,
    names,
    note_outcome,
    sandbox,
    tar_archive,
    tar_members,
)
from tests.puller.conftest import make_settings
from tests.puller.test_layers import MODELPACK_RAW, ImageStore, blob_for, compress

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MAX_BYTES = 256 * 1024

#: whiteout names: of a file, of a folder's content, of nothing, and hostile ones
WHITEOUTS = [
    ".wh.a",
    ".wh.b",
    ".wh.m",
    ".wh.models",
    "a/.wh.b",
    "models/.wh.a",
    ".wh..wh..opq",
    "a/.wh..wh..opq",
    "models/.wh..wh..opq",
    ".wh..",
    ".wh...",
    ".wh.",
    "a/.wh..",
    ".wh..wh.plnk",
    ".wh.outside",
    "../.wh.outside",
    "../../outside/.wh.precious.txt",
    ".wh.{OUT}",
    "{OUT}/.wh.precious.txt",
]

layer_members = tar_members | st.builds(
    TarMember,
    kind=st.sampled_from(["file", "file", "dir", "symlink"]),
    name=st.sampled_from(WHITEOUTS),
    linkname=st.sampled_from(["a", "..", "../.."]),
)

#: entries that refer to each other across layers: a folder, a file in it, links to it
plain_members = st.sampled_from(
    [
        TarMember("dir", "a/"),
        TarMember("dir", "models/"),
        TarMember("file", "a/b", data=b"b"),
        TarMember("file", "models/a", data=b"model"),
        TarMember("symlink", "models/up", linkname=".."),
        TarMember("symlink", "models/a", linkname="../a/b"),
        TarMember("symlink", "a", linkname="models"),
        TarMember("symlink", "d", linkname="."),
        TarMember("symlink", "models/esc", linkname="../d/../.."),
        TarMember("hardlink", "models/h", linkname="a/b"),
        TarMember("hardlink", "h", linkname="models/a"),
    ]
)


@dataclass(frozen=True)
class Layer:
    """A tar layer of ``members`` compressed with ``compression``, or (``raw_path``
    set) a raw layer of ``data`` placed at that path."""

    members: tuple[TarMember, ...] = ()
    compression: str = "none"
    raw_path: str | None = None
    data: bytes = b"raw"


compressions = st.sampled_from(list(MEDIA))
#: a layer: hostile, or made of the entries above only (so that many images apply and
#: their merged links are checked), or raw
layers = st.one_of(
    st.builds(
        Layer,
        members=st.lists(layer_members | plain_members, min_size=1, max_size=6).map(tuple),
        compression=compressions,
    ),
    st.builds(
        Layer, members=st.lists(plain_members, min_size=1, max_size=6).map(tuple), compression=compressions
    ),
    st.builds(
        Layer, raw_path=names | st.sampled_from(["models/w.bin", "w.bin"]), data=st.binary(max_size=32)
    ),
)

subtrees = st.sampled_from([None, None, "models", "models", "a", "../outside", "/abs", "models/../..", "."])


def image(box: Sandbox, store: ImageStore, stack: list[Layer], subtree: str | None) -> Plan:
    blobs: list[Blob] = []
    for part in stack:
        if part.raw_path is not None:
            blob = blob_for(part.data, MODELPACK_RAW, relpath=box.expand(part.raw_path))
            store.blobs[blob.name] = part.data
        else:
            raw = tar_archive(box, list(part.members), 1)  # PAX
            data = compress(raw, part.compression)
            blob = blob_for(data, MEDIA[part.compression])
            store.blobs[blob.name] = data
        blobs.append(blob)
    return store.add_blobs("hostile", blobs, subtree=subtree)


def apply_hostile(
    box: Sandbox, store: ImageStore, plan: Plan, dest: Path, cache: ContentCache | None
) -> None:
    """Apply ``plan`` into ``dest`` (below ``box``) and check every property."""
    others = list(box.writable)  # the cache, an earlier model built from it
    box.writable.append(dest)
    box.freeze()
    try:
        apply_layers(store, plan, dest, threading.Event(), settings=store.settings, cache=cache)
    except Exception as exc:  # the property: which exceptions may come out
        assert isinstance(exc, (InvalidRequest, StorageError)), f"{type(exc).__name__} escaped: {exc!r}"
        assert isinstance(exc, SidecarError) and str(exc).strip()
        str(exc).encode("utf-8")
        assert not dest.exists() or list(dest.iterdir()) == [], "a failed apply leaves the folder empty"
        note_outcome(f"refused: {type(exc).__name__}")
    else:
        note_outcome("applied")
        assert_contained(dest, shared=others)
        assert not [p for p in dest.iterdir() if p.name.startswith(".layers.")]
    box.assert_outside_untouched()


@FUZZ
@given(
    stack=st.lists(layers, min_size=1, max_size=3),
    subtree=subtrees,
    cached=st.booleans(),
)
@example(  # a whiteout of '..' and a link that leads out only once a lower layer's link is there
    stack=[
        Layer((TarMember("symlink", "d", linkname="."),)),
        Layer((TarMember("file", "a/.wh..", data=b""), TarMember("symlink", "esc", linkname="d/../.."))),
    ],
    subtree=None,
    cached=False,
)
@example(  # a hard link to a lower layer's file through a folder an upper layer made a link
    stack=[
        Layer((TarMember("dir", "a/"), TarMember("file", "a/b", data=b"b"))),
        Layer(
            (TarMember("symlink", "a", linkname="models"), TarMember("hardlink", "models/h", linkname="a/b"))
        ),
    ],
    subtree="models",
    cached=True,
)
@example(  # a raw layer named by a lone surrogate: no name, and no cache key either
    stack=[Layer(raw_path="w\udcff.bin")],
    subtree=None,
    cached=True,
)
@example(  # a raw layer whose path leads out, and a subtree that does
    stack=[Layer(raw_path="../../outside/pwned"), Layer((TarMember("file", "models/x", data=b"x"),))],
    subtree="../outside",
    cached=False,
)
def test_no_image_writes_outside_its_destination(
    tmp_path: Path, stack: list[Layer], subtree: str | None, cached: bool
) -> None:
    with sandbox(tmp_path) as box:
        settings = make_settings(box.root / "stage", pull_workers=2, archive_max_bytes=MAX_BYTES)
        store = ImageStore(StorageConfig(type="oci", fields={"registry": "registry.test"}), settings)
        plan = image(box, store, stack, subtree)
        cache: ContentCache | None = None
        if cached:
            cache = ContentCache(settings.root_model_dir, 16 * MAX_BYTES, metrics=PullMetrics())
            cache.open()
            box.writable.append(cache.path)
        apply_hostile(box, store, plan, box.dest, cache)
        if cache is not None:  # again: now built from the cached layer trees
            apply_hostile(box, store, plan, box.root / "stage" / "again", cache)
