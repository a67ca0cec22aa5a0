"""Azurite, Microsoft's Azure Storage emulator (blob service only), for the tests.

npm ``azurite@3.35.0`` (3.37 needs node 22) is installed once per machine under
``~/.cache/modelmesh-sidecar/npm/azurite-3.35.0`` (a ``.complete`` marker says the
install finished) and started as ``azurite-blob`` on 127.0.0.1 on a free port with
in-memory storage, in its own process group, stopped by PID.

``python -m tests.servers.azurite install`` does the install up front (``make test``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests import secrets_guard
from tests.servers.process import ManagedProcess, free_port, port_open, wait_until

AZURITE_VERSION = "3.35.0"

#: Azurite's well-known development account (published in Microsoft's docs)
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
secrets_guard.register_secret(ACCOUNT_KEY, "the Azurite account key (tests.servers.azurite.ACCOUNT_KEY)")


def cache_root() -> Path:
    base = os.environ.get("MODELMESH_SIDECAR_CACHE") or str(Path.home() / ".cache" / "modelmesh-sidecar")
    return Path(base) / "npm"


def install_dir() -> Path:
    return cache_root() / f"azurite-{AZURITE_VERSION}"


def ensure_azurite() -> Path:
    """Return the ``azurite-blob`` executable, installing azurite with npm first when
    it is missing or was left half-installed (no ``.complete`` marker)."""
    prefix = install_dir()
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if (prefix / ".complete").exists() and binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not on PATH: install Node.js 20 (apt-get install nodejs npm)")
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.mkdir(parents=True)
    subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"azurite@{AZURITE_VERSION}",
        ],
        check=True,
        timeout=600,
    )
    if not binary.exists():
        raise FileNotFoundError(f"npm installed azurite but {binary} is missing")
    (prefix / ".complete").touch()
    return binary


class AzuriteServer:
    """One ``azurite-blob`` process. ``start()`` waits until its port accepts TCP.

    With ``tls=(cert_file, key_file, ca_file)`` it serves HTTPS with that certificate
    (``ca_file`` is what clients trust); ``oauth=True`` (HTTPS only) also accepts
    bearer tokens, checking their claims (audience, issuer, expiry) but not their
    signature: Azurite's ``--oauth basic``.

    The account is ``devstoreaccount1``; :attr:`endpoint` is the account's blob endpoint
    (path-style, as Azurite serves it) and :attr:`connection_string` reaches it with
    the account key.
    """

    def __init__(
        self, log_dir: Path | None = None, *, tls: tuple[Path, Path, Path] | None = None, oauth: bool = False
    ) -> None:
        if oauth and tls is None:
            raise ValueError("azurite accepts OAuth tokens only over https: pass tls=(cert, key, ca)")
        self.port = 0
        self.tls = tls
        self.oauth = oauth
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="azurite-logs."))
        self._process: ManagedProcess | None = None
        self._workdir: Path | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{ACCOUNT_NAME}"

    @property
    def account_name(self) -> str:
        return ACCOUNT_NAME

    @property
    def account_key(self) -> str:
        return ACCOUNT_KEY

    @property
    def connection_string(self) -> str:
        return self.connection_string_with_key(ACCOUNT_KEY)

    def connection_string_with_key(self, key: str) -> str:
        """A connection string for this server's account with ``key`` as its AccountKey."""
        secrets_guard.register_secret(key, "an account key of AzuriteServer.connection_string_with_key")
        scheme = "https" if self.tls else "http"
        return (
            f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT_NAME};AccountKey={key};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def pid(self) -> int:
        assert self._process is not None, "azurite not started"
        return self._process.pid

    def start(self, timeout: float = 60.0) -> None:
        binary = ensure_azurite()
        self.port = free_port()
        self._workdir = Path(tempfile.mkdtemp(prefix="azurite-work."))
        argv = [
            str(binary),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
            "--loose",
        ]
        if self.tls is not None:
            argv += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        if self.oauth:
            argv += ["--oauth", "basic"]
        env = dict(os.environ)
        env["PATH"] = f"{Path(binary).resolve().parent}:{env.get('PATH', '')}"
        self._process = ManagedProcess(
            argv, log_path=self._log_dir / f"azurite-{self.port}.log", env=env, cwd=self._workdir
        )
        self._process.start()

        process = self._process

        def ready_or_dead() -> bool:
            return not process.alive() or port_open(self.port)

        try:
            wait_until(ready_or_dead, timeout, "azurite-blob")
            if not process.alive():
                raise RuntimeError(f"azurite-blob exited:\n{process.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def kill(self) -> None:
        """SIGKILL the server at once (fault tests); :meth:`stop` still cleans up."""
        if self._process is not None:
            self._process.kill()

    def log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""

    # --- fixtures through the official SDK ----------------------------------------------

    def service_client(self) -> Any:
        """An ``azure.storage.blob.BlobServiceClient`` for this server (account key)."""
        from azure.storage.blob import BlobServiceClient

        verify: Any = str(self.tls[2]) if self.tls else True
        return BlobServiceClient.from_connection_string(self.connection_string, connection_verify=verify)

    def create_container(self, container: str, *, public: bool = False) -> None:
        """Create ``container``; ``public=True`` lets anyone list and read it."""
        client = self.service_client().get_container_client(container)
        client.create_container(public_access="container" if public else None)

    def upload_blob(
        self,
        container: str,
        name: str,
        data: bytes,
        *,
        content_md5: bytes | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Write one blob (overwriting). ``content_md5``, when given, is then set as the
        blob's Content-MD5 property as it is, unchecked: a wrong one stands for bytes
        corrupted on the server. (Azurite itself stores the MD5 of single-shot uploads.)"""
        from azure.storage.blob import ContentSettings

        client = self.service_client().get_blob_client(container, name)
        client.upload_blob(data, overwrite=True, metadata=metadata, max_concurrency=4)
        if content_md5 is not None:
            client.set_http_headers(ContentSettings(content_md5=bytearray(content_md5)))

    def container_sas(self, container: str, *, permission: str = "rl", hours: float = 1.0) -> str:
        """A service SAS for ``container`` signed with the account key (no leading ``?``)."""
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(
            account_name=ACCOUNT_NAME,
            container_name=container,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=datetime.now(UTC) + timedelta(hours=hours),
        )
        secrets_guard.register_fields({"sas_token": sas}, "a SAS of AzuriteServer.container_sas")
        return str(sas)


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m tests.servers.azurite install")
    print(ensure_azurite())
