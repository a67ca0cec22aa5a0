"""The model key (LoadModelRequest.modelKey) and the modelId, parsed and validated.

Both arrive from the network: every field is checked for type, and a modelId must be
safe as one directory name. Errors are ``InvalidModelKey`` / ``InvalidModelId`` naming
the bad field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapter.errors import InvalidModelId, InvalidModelKey

MAX_MODEL_ID_LENGTH = 255


def validate_model_id(model_id: str) -> str:
    """Return ``model_id`` when it is safe as a single directory name.

    Refused: empty, not valid Unicode (a lone surrogate, which no file name can
    hold), longer than 255 bytes, ``.``/``..``, a ``/`` or ``\\``, a NUL or any other
    control character, or a leading ``_`` (names starting with ``_`` are the sidecar's
    own: ``_cache``, ``_mlserver_models``...).
    """
    if not model_id:
        raise InvalidModelId("modelId must not be empty")
    if not _is_unicode(model_id):
        raise InvalidModelId(f"modelId {model_id!r} is not valid Unicode (a lone surrogate)")
    if len(model_id.encode("utf-8")) > MAX_MODEL_ID_LENGTH:
        raise InvalidModelId(f"modelId is longer than {MAX_MODEL_ID_LENGTH} bytes")
    if model_id in (".", ".."):
        raise InvalidModelId(f"modelId {model_id!r} is not a valid name")
    for ch in model_id:
        if ch in "/\\":
            raise InvalidModelId(f"modelId {model_id!r} must not contain {ch!r}")
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            raise InvalidModelId(f"modelId {model_id!r} must not contain control characters")
    if model_id.startswith("_"):
        raise InvalidModelId(f"modelId {model_id!r} must not start with '_' (reserved for the sidecar)")
    return model_id


def _is_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (JSON can spell one, ``"\\ud800"``):
    such a string is no valid UTF-8, so it can be neither a file name nor sent on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unicode(name: str, *texts: str) -> None:
    """``InvalidModelKey`` naming the field when one of ``texts`` is not valid Unicode
    (the value itself is not quoted: it may be a secret)."""
    if not all(_is_unicode(text) for text in texts):
        raise InvalidModelKey(f"modelKey field {name!r} is not valid Unicode (a lone surrogate)")


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidModelKey(f"modelKey field {name!r} must be a string, got {type(value).__name__}")
    _check_unicode(name, value)
    return value


@dataclass(frozen=True)
class ModelKey:
    """The fields of a model key that the sidecar reads; unknown fields are ignored."""

    storage_key: str | None = None
    storage_params: Mapping[str, str] = field(default_factory=dict)
    model_type: Mapping[str, str] | None = None
    schema_path: str | None = None
    bucket: str | None = None
    disk_size_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        """Parse the modelKey JSON. An empty string is an empty key."""
        if not text or not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deeply nested"
            raise InvalidModelKey(f"modelKey is not valid JSON: {detail}") from None
        if not isinstance(data, dict):
            raise InvalidModelKey(f"modelKey must be a JSON object, got {type(data).__name__}")
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelKey:
        params = data.get("storage_params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidModelKey("modelKey field 'storage_params' must be an object of strings")
        for k, v in params.items():
            _check_unicode("storage_params", k)
            if not isinstance(v, str):
                raise InvalidModelKey(f"modelKey field 'storage_params.{k}' must be a string")
            _check_unicode(f"storage_params.{k}", v)
        model_type = data.get("model_type")
        if model_type is not None and (
            not isinstance(model_type, dict) or not all(isinstance(v, str) for v in model_type.values())
        ):
            raise InvalidModelKey("modelKey field 'model_type' must be an object of strings")
        for k, v in (model_type or {}).items():
            _check_unicode("model_type", k, v)
        size = data.get("disk_size_bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise InvalidModelKey("modelKey field 'disk_size_bytes' must be a non-negative integer")
        return cls(
            storage_key=_optional_str(data, "storage_key"),
            storage_params=dict(params),
            model_type=dict(model_type) if model_type is not None else None,
            schema_path=_optional_str(data, "schema_path"),
            bucket=_optional_str(data, "bucket"),
            disk_size_bytes=size,
        )

    def layout_type(self, model_type_field: str = "") -> str:
        """The model type used for layout: ``model_type.name`` lower-cased and cut at
        ``:``, else the format of the request's modelType (``mt:<format>[:<v>][|pv:..]``,
        ``rt:<runtime>``), else ``""``."""
        name = (self.model_type or {}).get("name", "")
        if name:
            return name.split(":", 1)[0].strip().lower()
        field_value = model_type_field.split("|", 1)[0].strip()
        if field_value.startswith("mt:"):
            return field_value[3:].split(":", 1)[0].strip().lower()
        return ""
