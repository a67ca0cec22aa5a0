"""The storage-config directory and its resolution rules.

PLACEHOLDER: StorageConfig is final; resolution is being written.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StorageConfig:
    """One resolved storage config: its ``type`` and its fields (after storage_params
    overrides). ``name`` is the storage-config entry it came from, if any. The repr
    shows field names only, never values (they hold secrets)."""

    type: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"StorageConfig(type={self.type!r}, name={self.name!r}, fields={sorted(self.fields)})"
