"""Small TorchServe model archives, built by the tests with torch-model-archiver.

The test process has no torch: the scripted module and the archives are made by the
TorchServe venv's own interpreter and tools (see :mod:`tests.servers.venvs`).

* the *affine* model: a TorchScript module computing ``2 * x + 1`` element-wise and a
  module-level handler that loads it once and answers each request, whose ``data``
  input is a JSON list of numbers, with the JSON list of results;
* the *broken* model: a handler that raises while the worker loads it, so that
  TorchServe refuses the registration.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Sequence
from pathlib import Path

from tests.servers.venvs import ensure_venv

#: the affine model's input and the answer it must give
AFFINE_INPUT: tuple[float, ...] = (0.0, 1.5, -2.0, 10.0)
AFFINE_EXPECTED: tuple[float, ...] = (1.0, 4.0, -3.0, 21.0)

_SCRIPT_MODULE = textwrap.dedent(
    """
    import sys

    import torch


    class Affine(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0 + 1.0


    torch.jit.script(Affine()).save(sys.argv[1])
    """
)

AFFINE_HANDLER = textwrap.dedent(
    '''
    """Answers a JSON list of numbers with 2 * x + 1 from the scripted module."""
    import json
    import os

    import torch

    _module = None


    def handle(data, context):
        global _module
        if _module is None:
            model_dir = context.system_properties["model_dir"]
            _module = torch.jit.load(os.path.join(model_dir, "affine.pt"))
        if data is None:  # the call made once when the worker loads the model
            return None
        answers = []
        for row in data:
            raw = row.get("data") or row.get("body")
            if isinstance(raw, (bytes, bytearray)):
                raw = raw.decode("utf-8")
            values = json.loads(raw) if isinstance(raw, str) else raw
            result = _module(torch.tensor(values, dtype=torch.float32))
            answers.append(json.dumps(result.tolist()))
        return answers
    '''
)

BROKEN_HANDLER = textwrap.dedent(
    '''
    """Fails while the worker loads the model."""


    def handle(data, context):
        raise RuntimeError("this model is broken on purpose")
    '''
)


def _venv_bin(tool: str) -> Path:
    return ensure_venv("torchserve") / "bin" / tool


def _run(argv: Sequence[str], cwd: Path) -> None:
    result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def build_mar(
    workdir: Path,
    name: str,
    handler_source: str,
    extra_files: Sequence[Path] = (),
    version: str = "1.0",
) -> Path:
    """Archive ``handler_source`` (and ``extra_files``) as ``workdir/<name>.mar`` with
    torch-model-archiver and return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    handler = workdir / f"{name}_handler.py"
    handler.write_text(handler_source)
    argv = [
        str(_venv_bin("torch-model-archiver")),
        "--model-name",
        name,
        "--version",
        version,
        "--handler",
        str(handler),
        "--export-path",
        str(workdir),
        "--force",
    ]
    if extra_files:
        argv += ["--extra-files", ",".join(str(p) for p in extra_files)]
    _run(argv, workdir)
    mar = workdir / f"{name}.mar"
    if not mar.is_file():
        raise RuntimeError(f"torch-model-archiver wrote no {mar}")
    return mar


def make_affine_mar(workdir: Path) -> Path:
    """The affine model's archive (a scripted module and its handler)."""
    workdir.mkdir(parents=True, exist_ok=True)
    module = workdir / "affine.pt"
    script = workdir / "script_affine.py"
    script.write_text(_SCRIPT_MODULE)
    _run([str(_venv_bin("python")), str(script), str(module)], workdir)
    return build_mar(workdir, "affine", AFFINE_HANDLER, extra_files=[module])


def make_broken_mar(workdir: Path) -> Path:
    """An archive whose handler fails when a worker loads it."""
    return build_mar(workdir, "broken", BROKEN_HANDLER)


def affine_input() -> dict[str, bytes]:
    """The ``input`` map of a Predictions request to the affine model."""
    return {"data": json.dumps(list(AFFINE_INPUT)).encode()}


def affine_answer(prediction: bytes) -> list[float]:
    """The numbers in the affine model's answer."""
    values = json.loads(prediction.decode("utf-8"))
    return [float(v) for v in values]
