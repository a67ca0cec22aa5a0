"""Regenerate the Python modules of our ``.proto`` files.

``python -m protos.generate [OUTDIR]`` writes ``*_pb2.py``, ``*_pb2_grpc.py`` and
``*_pb2.pyi`` beside each ``.proto`` (or under ``OUTDIR/protos/...`` when given, which
the drift test uses). Proto paths are given relative to the repository root, so the
generated imports read ``protos.mmesh...`` / ``protos.inference...`` and need no
rewriting. The generator is the pinned ``grpcio-tools`` of the dev extra: the same
pin always produces the same bytes.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: every proto we own, relative to the repository root
PROTO_FILES: tuple[str, ...] = (
    "protos/mmesh/model_runtime.proto",
    "protos/inference/grpc_service.proto",
    "protos/torchserve/management.proto",
    "protos/torchserve/inference.proto",
)


class ProtocError(RuntimeError):
    """protoc refused the sources or could not write its output."""


def generate(out_dir: Path | None = None) -> list[Path]:
    """Run protoc over :data:`PROTO_FILES` and return the paths of the files written.

    Output goes to ``out_dir`` (created when missing), default the repository root,
    i.e. in place. Raises :class:`ProtocError` when protoc exits non-zero.
    """
    target = (out_dir if out_dir is not None else REPO_ROOT).resolve()
    target.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={target}",
        f"--grpc_python_out={target}",
        f"--pyi_out={target}",
        *(str(REPO_ROOT / name) for name in PROTO_FILES),
    ]
    status = protoc.main(argv)
    if status != 0:
        raise ProtocError(f"protoc exited with status {status} for {', '.join(PROTO_FILES)}")
    written: list[Path] = []
    for name in PROTO_FILES:
        stem = target / name.removesuffix(".proto")
        written += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2_grpc.py"), Path(f"{stem}_pb2.pyi")]
    missing = [str(p) for p in written if not p.is_file()]
    if missing:
        raise ProtocError(f"protoc did not write {', '.join(missing)}")
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m protos.generate [OUTDIR]``; 0 on success."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m protos.generate [OUTDIR]", file=sys.stderr)
        return 2
    try:
        written = generate(Path(args[0]) if args else None)
    except ProtocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
