"""Runtime virtual environments, built once per machine and cached outside the
checkout under ~/.cache/modelmesh-sidecar/venvs/<name>-<hash of its requirements>."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REQUIREMENTS_DIR = Path(__file__).parent / "requirements"


def cache_root() -> Path:
    base = os.environ.get("MODELMESH_SIDECAR_CACHE") or str(Path.home() / ".cache" / "modelmesh-sidecar")
    return Path(base) / "venvs"


def venv_path(name: str) -> Path:
    requirements = REQUIREMENTS_DIR / f"{name}.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    return cache_root() / f"{name}-{digest}"


def ensure_venv(name: str) -> Path:
    """Return the venv for ``name``, building it first when it is missing or was left
    half-built (no ``.complete`` marker)."""
    path = venv_path(name)
    if (path / ".complete").exists():
        return path
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run(
        [str(path / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS_DIR / f"{name}.txt")],
        check=True,
    )
    (path / ".complete").touch()
    return path


if __name__ == "__main__":
    for venv_name in sys.argv[1:]:
        print(ensure_venv(venv_name))
