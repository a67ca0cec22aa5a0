"""Storage URIs (an InferenceService ``storageUri``) turned into storage params and a
path, the way the modelmesh-serving controller does it (contract, section 3)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from adapter.errors import InvalidRequest

AZURE_BLOB_SUFFIX = ".blob.core.windows.net"


def params_for_uri(uri: str) -> tuple[dict[str, str], str]:
    """``(storage_params, path)`` for ``uri``; ``InvalidRequest`` for an unsupported
    scheme or a URI without its bucket/name part."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("s3", "gs", "pvc"):
        if not parts.netloc:
            raise InvalidRequest(f"storage URI {uri!r} has no bucket or name after {scheme}://")
        kind = {"s3": "s3", "gs": "gcs", "pvc": "pvc"}[scheme]
        field = "name" if kind == "pvc" else "bucket"
        return {"type": kind, field: parts.netloc}, unquote(parts.path).lstrip("/")
    if scheme in ("http", "https"):
        host = parts.hostname or ""
        if not host:
            raise InvalidRequest(f"storage URI {uri!r} has no host")
        if host.endswith(AZURE_BLOB_SUFFIX):
            account = host[: -len(AZURE_BLOB_SUFFIX)]
            container, _, path = unquote(parts.path).lstrip("/").partition("/")
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
        return {"type": "file", "root": "/"}, unquote(parts.path)
    raise InvalidRequest(
        f"unsupported storage URI scheme {parts.scheme or '(none)'!r} in {uri!r} "
        "(supported: s3, gs, pvc, http, https, oci, file)"
    )
