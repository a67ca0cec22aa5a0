"""Storage type ``pvc``: a PersistentVolumeClaim mounted in the pod.

Config ``{"type": "pvc", "name": NAME}`` (``pvc://NAME/path`` gives it). The claim is
mounted at ``PVC_MOUNTS_DIR/NAME`` (``/pvc_mounts/NAME`` by default) and a model at
``PVC_MOUNTS_DIR/NAME/<path>`` is used in place: the engine links it rather than
copying (:attr:`links_in_place`). ``plan`` and ``open_range`` still work, shared with
the ``file`` backend, so the engine can copy when asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from adapter.errors import StorageConfigError, UnsafePath
from puller.placement import first_link_outside
from puller.storage.file import LocalDirectoryStorage

if TYPE_CHECKING:
    from adapter.settings import Settings
    from puller.config import StorageConfig


def validate_pvc_name(name: object) -> str:
    """Return ``name`` when it can name one folder under the mounts directory.
    ``StorageConfigError`` when it is missing or not a string; ``UnsafePath`` for a
    ``/``, ``..``, a NUL or ``.``."""
    if not isinstance(name, str) or not name:
        raise StorageConfigError('pvc storage needs "name", the name of the PersistentVolumeClaim')
    if name == "." or ".." in name or "/" in name or "\x00" in name:
        raise UnsafePath(f"pvc name {name!r} must be a single folder name (no '/', '..' or NUL)")
    return name


class PVCStorage(LocalDirectoryStorage):
    """Type ``pvc``: models on a claim mounted at ``settings.pvc_mounts_dir/<name>``."""

    types: ClassVar[tuple[str, ...]] = ("pvc",)
    links_in_place: ClassVar[bool] = True

    def __init__(self, config: StorageConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.name = validate_pvc_name(config.get("name"))
        mounts = Path(os.path.normpath(Path(settings.pvc_mounts_dir).absolute()))
        self.root = mounts / self.name

    def describe(self) -> str:
        return f"PVC {self.name!r}"

    def local_path(self, path: str) -> str:
        """The absolute resolved path of the model at ``path`` on the mounted claim, to
        be linked. ``StorageNotFound`` when the claim is not mounted or nothing is
        there; ``UnsafePath`` when ``path`` (or a link on the way), or a link inside
        the model's folder, leads outside the claim's mount: the runtime follows the
        links it finds, so none may lead it elsewhere in its container."""
        resolved = self.resolve(path)
        if Path(resolved).is_dir():
            outside = first_link_outside(Path(resolved), self._root_real())
            if outside is not None:
                inner = outside.relative_to(resolved).as_posix()
                raise UnsafePath(
                    f"{self.describe()}: the link '{inner}' in model '{path}' leads outside the claim"
                )
        return resolved

    def identity(self) -> str:
        return f"pvc:{self.name}"
