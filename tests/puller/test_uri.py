from __future__ import annotations

import pytest

from adapter.errors import InvalidRequest
from puller.uri import params_for_uri


@pytest.mark.parametrize(
    ("uri", "params", "path"),
    [
        ("s3://bucket/some/model", {"type": "s3", "bucket": "bucket"}, "some/model"),
        ("s3://bucket", {"type": "s3", "bucket": "bucket"}, ""),
        ("gs://b/p/q", {"type": "gcs", "bucket": "b"}, "p/q"),
        ("pvc://claim/models/m", {"type": "pvc", "name": "claim"}, "models/m"),
        (
            "https://acct.blob.core.windows.net/cont/dir/m.onnx",
            {"type": "azure", "account_name": "acct", "container": "cont"},
            "dir/m.onnx",
        ),
        (
            "https://example.com/files/m.bin?sig=x",
            {"type": "http", "url": "https://example.com"},
            "/files/m.bin?sig=x",
        ),
        ("http://10.0.0.1:8080/m", {"type": "http", "url": "http://10.0.0.1:8080"}, "/m"),
        (
            "oci://127.0.0.1:5000/models/iris:v1",
            {"type": "oci", "registry": "127.0.0.1:5000"},
            "models/iris:v1",
        ),
        (
            "oci://ghcr.io/org/m@sha256:" + "a" * 64,
            {"type": "oci", "registry": "ghcr.io"},
            "org/m@sha256:" + "a" * 64,
        ),
        ("file:///srv/models/m", {"type": "file", "root": "/"}, "/srv/models/m"),
        ("s3://bucket/with%20space", {"type": "s3", "bucket": "bucket"}, "with space"),
    ],
)
def test_uris_map_like_the_controller(uri: str, params: dict[str, str], path: str) -> None:
    assert params_for_uri(uri) == (params, path)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("ftp://host/model", "unsupported storage URI scheme"),
        ("model/without/scheme", "unsupported storage URI scheme"),
        ("s3:///no-bucket", "no bucket"),
        ("oci://registry-only", "must name a registry and a repository"),
        ("https://acct.blob.core.windows.net/", "names no container"),
    ],
)
def test_bad_uris_are_refused_clearly(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        params_for_uri(uri)
