"""What the puller is asked for and what it hands back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from puller.model_key import ModelKey


@dataclass(frozen=True)
class PullRequest:
    """One model to fetch: the fields of a LoadModelRequest, the key already parsed."""

    model_id: str
    model_path: str
    model_key: ModelKey
    model_type: str = ""


@dataclass(frozen=True)
class LocalModel:
    """A model complete on local disk under ROOT_MODEL_DIR/<model_id>/.

    ``path`` is the model file or directory (``ROOT_MODEL_DIR/<id>/<basename>``);
    ``schema_path`` the schema file beside it when the key named one.
    """

    model_id: str
    path: Path
    disk_size_bytes: int
    model_type: str
    schema_path: Path | None
    model_key: ModelKey

    def rewritten_key(self) -> str:
        """The modelKey a runtime (or the adapter behind a standalone puller) sees:
        model_type, disk_size_bytes and the local schema path."""
        key: dict[str, object] = {"disk_size_bytes": self.disk_size_bytes}
        if self.model_key.model_type is not None:
            key["model_type"] = dict(self.model_key.model_type)
        if self.schema_path is not None:
            key["schema_path"] = str(self.schema_path)
        return json.dumps(key, separators=(",", ":"), sort_keys=True)
