"""Storage URIs (an InferenceService ``storageUri``) turned into storage params and a
path, the way the modelmesh-serving controller does it (contract, section 3)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from adapter.errors import InvalidRequest

AZURE_BLOB_SUFFIX = ".blob.core.windows.net"


def params_for_uri(uri: str) -> tuple[dict[str, str], str]:
    """``(storage_params, path)`` for ``uri``; ``InvalidRequest`` for an unsupported
    scheme, a URI without its bucket/name part, one that is not a URI at all (an
    unbalanced ``[`` in the host), or a NUL anywhere (written or percent-encoded)."""
    if "\x00" in uri:
        raise InvalidRequest("storage URI contains a NUL character")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise InvalidRequest(f"storage URI {uri!r} cannot be parsed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("s3", "gs", "pvc"):
        if not parts.netloc:
            raise InvalidRequest(f"storage URI {uri!r} has no bucket or name after {scheme}://")
        kind = {"s3": "s3", "gs": "gcs", "pvc": "pvc"}[scheme]
        field = "name" if kind == "pvc" else "bucket"
        return {"type": kind, field: parts.netloc}, _decoded_path(uri, parts.path).lstrip("/")
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host:
            raise InvalidRequest(f"storage URI {uri!r} has no host")
        if host.endswith(AZURE_BLOB_SUFFIX):
            account = host[: -len(AZURE_BLOB_SUFFIX)]
            if not account:
                raise InvalidRequest(f"storage URI {uri!r} names no storage account")
            container, _, path = _decoded_path(uri, parts.path).lstrip("/").partition("/")
            if not container:
                raise InvalidRequest(f"storage URI {uri!r} names no container")
            return {"type": "azure", "account_name": account, "container": container}, path
        path = parts.path
        if parts.query:
            path = f"{path}?{parts.query}"
        return {"type": "http", "url": f"{scheme}://{parts.netloc}"}, path
    if scheme == "oci":
        # oci://registry[:port]/repository[:tag|@sha256:digest]
        if not parts.netloc or not parts.path.strip("/"):
            raise InvalidRequest(f"storage URI {uri!r} must name a registry and a repository")
        reference = parts.path.lstrip("/")
        if parts.query:
            raise InvalidRequest(f"storage URI {uri!r}: an image reference takes no query string")
        return {"type": "oci", "registry": parts.netloc}, reference
    if scheme == "file":
        return {"type": "file", "root": "/"}, _decoded_path(uri, parts.path)
    raise InvalidRequest(
        f"unsupported storage URI scheme {parts.scheme or '(none)'!r} in {uri!r} "
        "(supported: s3, gs, pvc, http, https, oci, file)"
    )


def _decoded_path(uri: str, path: str) -> str:
    """``path`` percent-decoded; ``InvalidRequest`` when that gives a NUL (``%00``),
    which no object name or file name may hold."""
    decoded = unquote(path)
    if "\x00" in decoded:
        raise InvalidRequest(f"storage URI {uri!r} has a NUL character (%00) in its path")
    return decoded
