"""A moto S3 server for the tests: ``moto_server -H 127.0.0.1 -p PORT`` from this
venv, in its own process group, stopped by PID."""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.servers.process import ManagedProcess, free_port, wait_until

#: moto accepts any credentials unless told otherwise; these are what client() uses
DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret-key"


def _moto_server_binary() -> Path:
    path = Path(sys.executable).parent / "moto_server"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install 'moto[server]' into this venv")
    return path


class MotoS3Server:
    """One moto server process. ``start()`` waits until GET / answers 200.

    With ``tls=(cert_file, key_file, ca_file)`` it serves HTTPS with that certificate;
    ``ca_file`` is what clients (and the readiness check) trust.
    """

    def __init__(self, log_dir: Path | None = None, tls: tuple[Path, Path, Path] | None = None) -> None:
        self.port = 0
        self.tls = tls
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="moto-logs."))
        self._process: ManagedProcess | None = None

    @property
    def endpoint_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        argv = [str(_moto_server_binary()), "-H", "127.0.0.1", "-p", str(self.port)]
        if self.tls:
            argv += ["-s", "-c", str(self.tls[0]), "-k", str(self.tls[1])]
        self._process = ManagedProcess(argv, log_path=self._log_dir / f"moto-{self.port}.log", env=env)
        self._process.start()

        def ready() -> bool:
            assert self._process is not None
            if not self._process.alive():
                raise RuntimeError(f"moto_server exited:\n{self._process.log_tail()}")
            with urllib.request.urlopen(
                self.endpoint_url + "/", timeout=1, context=self._ssl_context()
            ) as resp:
                return bool(resp.status == 200)

        try:
            wait_until(ready, timeout, "moto_server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""

    def _post(self, path: str, data: bytes) -> None:
        request = urllib.request.Request(
            self.endpoint_url + path, data=data, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10, context=self._ssl_context()) as resp:
            resp.read()

    def require_auth(self) -> None:
        """From now on every request needs credentials moto's IAM knows: what moto's
        ``INITIAL_NO_AUTH_ACTION_COUNT`` setting does, switched on at run time through
        ``/moto-api/reset-auth`` so that fixtures can be created first."""
        self._post("/moto-api/reset-auth", b"0")

    def allow_any_auth(self) -> None:
        """Back to moto's default: any credentials are accepted."""
        self._post("/moto-api/reset-auth", b"inf")

    def client(self, service: str = "s3", key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET) -> Any:
        """A boto3 client for this server (dummy keys unless given)."""
        session: Any = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, region_name="us-east-1"
        )
        return session.client(
            service,
            endpoint_url=self.endpoint_url,
            verify=str(self.tls[2]) if self.tls else None,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def put_tree(self, bucket: str, prefix: str, local_dir: Path) -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; return
        the keys written."""
        client = self.client()
        keys: list[str] = []
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
            keys.append(key)
        return keys
