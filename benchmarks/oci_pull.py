"""OCI pull benchmark: our puller against ``skopeo copy`` plus untar, on a ModelCar image.

One run generates (once, cached) a KServe ModelCar image of about ``--size-mib`` (default
1 GiB) in five layers: a small gzip base layer (a few files outside ``models/`` and the
model's small files: config, tokenizer) and four uncompressed tar layers of one weight
shard each (random bytes; uncompressed, as olot writes weight layers). It starts
Debian's ``docker-registry`` on 127.0.0.1 (open auth, plain HTTP, a free port), pushes
the image, and then, interleaved over ``--rounds`` rounds:

- ``mesh-puller``: ``mesh-puller pull oci://127.0.0.1:PORT/bench/modelcar:v1 DEST
  --param insecure=true``, which streams every layer through its sha256, decompression
  and tar extraction, in parallel, and keeps ``models/``;
- ``skopeo+untar``: ``skopeo copy --src-tls-verify=false docker://... dir:BLOBS``
  (skopeo verifies each blob's digest while it copies), then ``tar -xf`` (``-xzf`` for
  the gzip layer) of each layer in order into a folder, of which ``models/`` is kept.
  The two steps are timed together and separately.

Every resulting file is checked by sha256 against the source. Each run records its wall
time, MB/s (image bytes: layers and config as stored, / wall), the CPU seconds of the
tool's process tree, its peak RSS, the registry's CPU and what the rest of the machine
used meanwhile. When our pull is the slower one, one more pull of it runs under py-spy.

Results: a table on stdout, ``benchmarks/results/oci_pull-<date>.json`` and the plot
``docs/img/oci_pull.png``. See ``benchmarks/README.md``.

Run with the project's venv (``.venv/bin/python benchmarks/oci_pull.py``). The process
measurement, the benchmark venv (matplotlib, py-spy), the machine and load figures and
the file checks come from ``pull_throughput.py``; the registry and the image push from
``tests/servers``. Like ``pull_throughput.py``, this file imports only the standard
library (and that module) at the top: the plot step runs it again with the benchmark
venv's Python.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pull_throughput import (
    DEV_BIN,
    MIB,
    ROOT,
    BenchmarkError,
    Measured,
    SourceFile,
    base_env,
    cache_root,
    cmd_output,
    ensure_bench_venv,
    machine_busy_seconds,
    machine_info,
    other_load,
    own_cpu_seconds,
    process_cpu_seconds,
    process_snapshot,
    process_tree,
    py_spy_command,
    run_measured,
    summarize_profile,
    verify_files,
    work_folder,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PLOT = ROOT / "docs" / "img" / "oci_pull.png"

OURS = "mesh-puller"
BASELINE = "skopeo+untar"
TOOLS = (OURS, BASELINE)
#: the two timed steps of the baseline
SKOPEO_STEP = "skopeo copy"
UNTAR_STEP = "untar"

REPOSITORY = "bench/modelcar"
TAG = "v1"
MODEL_DIR = "models"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

SKOPEO = Path("/usr/bin/skopeo")
#: weight layers (each one shard) besides the base layer
WEIGHT_LAYERS = 4
#: the share of the image in the model's small files (config, tokenizer), in the base layer
SMALL_SHARE = 0.01
#: the model's small files and their parts of the small share
SMALL_FILES = (
    ("config.json", 1),
    ("generation_config.json", 1),
    ("model.safetensors.index.json", 2),
    ("special_tokens_map.json", 1),
    ("tokenizer_config.json", 4),
    ("tokenizer.json", 60),
    ("vocab.json", 20),
    ("merges.txt", 11),
)
#: what the base layer holds outside ``models/``
BASE_FILES = {
    "bin/sh": b"#!/bin/false\n",
    "etc/os-release": b'NAME="bench"\nID=bench\nVERSION_ID=1\n',
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "usr/share/doc/bench/README": b"A generated ModelCar image for benchmarks/oci_pull.py.\n",
}
#: tar's own read size when writing the layers
TAR_BUFFER = 4 * MIB

PLOT_COLORS = {OURS: "#2a7ab0", SKOPEO_STEP: "#7a7a7a", UNTAR_STEP: "#b8b8b8"}

#: the untar step: every layer in order into ROOT (``gz`` or ``tar`` before each
#: blob), then ROOT/models becomes DEST and the rest of the image is removed
UNTAR_SCRIPT = """set -e
root=$1; dest=$2; shift 2
mkdir "$root"
while [ "$#" -gt 0 ]; do
  if [ "$1" = gz ]; then tar -xzf "$2" -C "$root"; else tar -xf "$2" -C "$root"; fi
  shift 2
done
mv "$root/models" "$dest"
rm -rf "$root"
"""


# --- the image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerBlob:
    """One generated layer: its blob is ``<image folder>/blobs/<hex of digest>``."""

    media_type: str
    digest: str
    size: int
    #: sha256 of the uncompressed tar (the config's ``rootfs.diff_ids``)
    diff_id: str
    #: paths of the files in the layer
    paths: tuple[str, ...]

    @property
    def gzip(self) -> bool:
        return self.media_type.endswith("+gzip")


@dataclass(frozen=True)
class BenchImage:
    """The generated image: blobs, config, manifest, and the model's files (relpaths
    below ``models/``) with their sha256."""

    size_mib: int
    folder: Path
    config_digest: str
    config_size: int
    layers: tuple[LayerBlob, ...]
    files: tuple[SourceFile, ...]

    def blob_path(self, digest: str) -> Path:
        return self.folder / "blobs" / digest.removeprefix("sha256:")

    @property
    def manifest_bytes(self) -> bytes:
        return (self.folder / "manifest.json").read_bytes()

    @property
    def image_bytes(self) -> int:
        """Bytes a pull receives: every layer as stored, and the config."""
        return sum(layer.size for layer in self.layers) + self.config_size

    @property
    def model_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class FileSpec:
    path: str
    size: int
    #: ``text``: base64 characters (compresses to ~3/4); ``random``: random bytes
    kind: str


def image_layout(size_mib: int) -> list[tuple[str, list[FileSpec]]]:
    """``(media type, files)`` of each layer, lowest first: the gzip base layer (the
    files of ``BASE_FILES`` and the model's small files, ``SMALL_SHARE`` of the size),
    then ``WEIGHT_LAYERS`` uncompressed layers of one weight shard each."""
    total = size_mib * MIB
    small_total = int(total * SMALL_SHARE)
    parts = sum(part for _, part in SMALL_FILES)
    small = [
        FileSpec(f"{MODEL_DIR}/{name}", small_total * part // parts, "text") for name, part in SMALL_FILES
    ]
    base = [FileSpec(path, len(data), "fixed") for path, data in BASE_FILES.items()]
    weights_total = total - sum(f.size for f in small)
    shard = weights_total // WEIGHT_LAYERS
    layout = [(LAYER_GZIP, base + small)]
    for i in range(WEIGHT_LAYERS):
        size = shard if i < WEIGHT_LAYERS - 1 else weights_total - shard * (WEIGHT_LAYERS - 1)
        name = f"{MODEL_DIR}/model-{i + 1:05d}-of-{WEIGHT_LAYERS:05d}.safetensors"
        layout.append((LAYER_TAR, [FileSpec(name, size, "random")]))
    return layout


class _Content:
    """A file's bytes made as tarfile reads them, hashed on the way."""

    def __init__(self, spec: FileSpec) -> None:
        self.spec = spec
        self.left = spec.size
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        count = self.left if size < 0 else min(size, self.left)
        if self.spec.kind == "fixed":
            data = BASE_FILES[self.spec.path][self.spec.size - self.left :][:count]
        elif self.spec.kind == "text":
            data = base64.b64encode(os.urandom(count * 3 // 4 + 3))[:count]
        else:
            data = os.urandom(count)
        self.left -= len(data)
        self.sha256.update(data)
        return data


def _tar_info(name: str, size: int = 0, folder: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if folder:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.size = size
        info.mode = 0o755 if name.startswith("bin/") else 0o644
    return info


def _write_layer(path: Path, media_type: str, files: Sequence[FileSpec]) -> tuple[LayerBlob, dict[str, str]]:
    """Write one layer blob of ``files`` to ``path``; returns its descriptor and the
    sha256 of each file."""
    shas: dict[str, str] = {}
    parents = {str(PurePosixPath(f.path).parent) for f in files} - {"."}
    folders = sorted({folder for p in parents for folder in _parents(p)}, key=lambda p: (p.count("/"), p))
    with path.open("wb") as out:
        compressed = media_type == LAYER_GZIP
        stream: gzip.GzipFile | io.BufferedWriter = (
            gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) if compressed else out
        )
        with tarfile.TarFile(
            fileobj=stream, mode="w", format=tarfile.PAX_FORMAT, copybufsize=TAR_BUFFER
        ) as tar:
            for folder in folders:
                tar.addfile(_tar_info(folder, folder=True))
            for spec in files:
                content = _Content(spec)
                tar.addfile(_tar_info(spec.path, spec.size), content)
                shas[spec.path] = content.sha256.hexdigest()
        if compressed:
            stream.close()
    with path.open("rb") as fh:
        digest = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    diff_id = digest
    if compressed:
        with gzip.open(path, "rb") as raw:
            diff_id = "sha256:" + hashlib.file_digest(raw, "sha256").hexdigest()
    blob = LayerBlob(media_type, digest, path.stat().st_size, diff_id, tuple(f.path for f in files))
    return blob, shas


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def ensure_image(size_mib: int) -> BenchImage:
    """The image of ``size_mib``, generated once under
    ``<cache>/bench-data/oci-modelcar-<size>mib/`` (``blobs/``, ``manifest.json``); its
    description (layers, files and their sha256) is written last, beside it, as
    ``oci-modelcar-<size>mib.json``: without it the folder is made again."""
    data_root = cache_root() / "bench-data"
    folder = data_root / f"oci-modelcar-{size_mib}mib"
    description = data_root / f"oci-modelcar-{size_mib}mib.json"
    if description.exists() and folder.is_dir():
        image = _load_image(json.loads(description.read_text()), folder)
        blobs = [(image.config_digest, image.config_size)] + [(lay.digest, lay.size) for lay in image.layers]
        if all(image.blob_path(d).is_file() and image.blob_path(d).stat().st_size == s for d, s in blobs):
            return image
    print(f"generating a {size_mib} MiB ModelCar image under {folder} (once) ...", flush=True)
    description.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)
    data_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".oci-{size_mib}mib.", dir=data_root))
    (staging / "blobs").mkdir()
    layers: list[LayerBlob] = []
    files: list[SourceFile] = []
    for number, (media_type, specs) in enumerate(image_layout(size_mib)):
        part = staging / "blobs" / f"layer-{number}.part"
        blob, shas = _write_layer(part, media_type, specs)
        part.rename(staging / "blobs" / blob.digest.removeprefix("sha256:"))
        layers.append(blob)
        prefix = MODEL_DIR + "/"
        files += [
            SourceFile(s.path.removeprefix(prefix), s.size, shas[s.path])
            for s in specs
            if s.path.startswith(prefix)
        ]
    config = _canonical(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    )
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    (staging / "blobs" / config_digest.removeprefix("sha256:")).write_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": lay.media_type, "digest": lay.digest, "size": lay.size} for lay in layers],
    }
    (staging / "manifest.json").write_bytes(_canonical(manifest))
    staging.rename(folder)
    image = BenchImage(size_mib, folder, config_digest, len(config), tuple(layers), tuple(files))
    description.write_text(json.dumps(_describe(image), indent=1) + "\n")
    return image


def _describe(image: BenchImage) -> dict[str, Any]:
    return {
        "size_mib": image.size_mib,
        "config": {"digest": image.config_digest, "size": image.config_size},
        "layers": [dataclasses.asdict(layer) for layer in image.layers],
        "files": [dataclasses.asdict(f) for f in image.files],
    }


def _load_image(data: dict[str, Any], folder: Path) -> BenchImage:
    layers = tuple(
        LayerBlob(e["media_type"], e["digest"], e["size"], e["diff_id"], tuple(e["paths"]))
        for e in data["layers"]
    )
    files = tuple(SourceFile(e["relpath"], e["size"], e["sha256"]) for e in data["files"])
    config = data["config"]
    return BenchImage(data["size_mib"], folder, config["digest"], config["size"], layers, files)


# --- the registry ---------------------------------------------------------------------------


def _tests_servers() -> None:
    """Make ``tests.servers`` importable (the project root on ``sys.path``)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def registry_pid() -> int:
    """The PID of the ``docker-registry`` this process started (a child of ours)."""
    for pid in process_tree(os.getpid())[1:]:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/exe").resolve().name == "docker-registry":
                return pid
    raise BenchmarkError("the docker-registry process is not among this process's children")


def push_image(base_url: str, image: BenchImage) -> float:
    """Push the image's blobs (one in memory at a time), then its manifest under
    ``TAG``, with the tests' pusher; returns the seconds it took."""
    _tests_servers()
    from tests.servers.oci_images import ImagePusher

    started = time.monotonic()
    pusher = ImagePusher(base_url)
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        pushed = pusher.push_blob(REPOSITORY, image.blob_path(digest).read_bytes())
        if pushed != digest:
            raise BenchmarkError(f"pushed {pushed}, expected {digest}: the cached image is damaged")
    pusher.push_manifest(REPOSITORY, TAG, image.manifest_bytes, OCI_MANIFEST)
    return time.monotonic() - started


# --- the tools ------------------------------------------------------------------------------


@dataclass
class Context:
    image: BenchImage
    work: Path
    bench_venv: Path
    registry_host: str
    registry_pid: int
    timeout: float
    #: CPU seconds other processes used during the timed runs, by command
    others: dict[str, float] = field(default_factory=dict)

    @property
    def image_ref(self) -> str:
        return f"{self.registry_host}/{REPOSITORY}:{TAG}"


@dataclass
class Step:
    """One measured process tree of a run."""

    name: str
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int


@dataclass
class Run:
    tool: str
    round: int
    wall_seconds: float
    mb_per_s: float
    cpu_seconds: float
    cpu_seconds_per_gb: float
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int
    registry_cpu_seconds: float
    others_cpu_seconds: float
    steps: list[Step]
    #: the pull's own duration as the tool reports it (our ``pull`` summary)
    tool_seconds: float | None
    verified: bool


def _step(name: str, measured: Measured, what: str, log_path: Path) -> Step:
    if measured.timed_out:
        raise BenchmarkError(f"{what} did not finish in time (log: {log_path})")
    if measured.exit_code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchmarkError(f"{what} exited with {measured.exit_code}:\n{tail}")
    return Step(
        name=name,
        wall_seconds=round(measured.wall_seconds, 4),
        cpu_seconds=round(measured.cpu_seconds, 3),
        peak_rss_mib=round(measured.peak_tree_rss_kib / 1024, 1),
        peak_pss_mib=round(measured.peak_tree_pss_kib / 1024, 1),
        processes=measured.processes,
    )


def ours_command(ctx: Context, dest: Path) -> tuple[list[str], dict[str, str]]:
    """Our pull of the image into ``dest``; every ``PULL_*`` setting at its default
    (the environment is built from scratch), an empty storage config."""
    env = base_env()
    config_dir = ctx.work / "storage-config"
    config_dir.mkdir(exist_ok=True)
    env.update(STORAGE_CONFIG_DIR=str(config_dir), LOG_FORMAT="json")
    argv = [
        str(DEV_BIN / "mesh-puller"),
        "pull",
        f"oci://{ctx.image_ref}",
        str(dest),
        "--param",
        "insecure=true",
    ]
    return argv, env


def _pull_summary(log_path: Path) -> dict[str, Any]:
    """The JSON line ``mesh-puller pull`` prints last."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if line.startswith('{"path"'):
            with contextlib.suppress(ValueError):
                found: dict[str, Any] = json.loads(line)
                return found
    raise BenchmarkError(f"no pull summary in {log_path}")


def run_ours(ctx: Context, run_dir: Path) -> tuple[list[Step], Path, float | None]:
    argv, env = ours_command(ctx, run_dir / "dest")
    log_path = run_dir / "mesh-puller.log"
    measured = run_measured(argv, env, log_path, ctx.timeout, cwd=run_dir)
    step = _step(OURS, measured, OURS, log_path)
    summary = _pull_summary(log_path)
    return [step], Path(summary["path"]), float(summary["seconds"])


def _skopeo_blob(folder: Path, digest: str) -> Path:
    """A blob in a ``dir:`` copy: ``<hex>`` (or ``<hex>.tar`` of older skopeo)."""
    hexdigest = digest.removeprefix("sha256:")
    for candidate in (folder / hexdigest, folder / f"{hexdigest}.tar"):
        if candidate.is_file():
            return candidate
    raise BenchmarkError(f"skopeo's copy in {folder} has no blob {digest}")


def run_baseline(ctx: Context, run_dir: Path) -> tuple[list[Step], Path, float | None]:
    env = base_env()
    blobs = run_dir / "skopeo-dir"
    log_path = run_dir / "skopeo.log"
    argv = [
        str(SKOPEO),
        "copy",
        "--src-tls-verify=false",
        f"docker://{ctx.image_ref}",
        f"dir:{blobs}",
    ]
    copy = _step(
        SKOPEO_STEP, run_measured(argv, env, log_path, ctx.timeout, cwd=run_dir), "skopeo copy", log_path
    )
    # the layer order, from the manifest skopeo wrote (not timed: a few microseconds)
    manifest = json.loads((blobs / "manifest.json").read_bytes())
    layer_args: list[str] = []
    for layer in manifest["layers"]:
        kind = "gz" if str(layer["mediaType"]).endswith("gzip") else "tar"
        layer_args += [kind, str(_skopeo_blob(blobs, layer["digest"]))]
    dest = run_dir / "dest"
    argv = ["/bin/sh", "-c", UNTAR_SCRIPT, "untar", str(run_dir / "rootfs"), str(dest), *layer_args]
    log_path = run_dir / "untar.log"
    untar = _step(UNTAR_STEP, run_measured(argv, env, log_path, ctx.timeout, cwd=run_dir), "untar", log_path)
    return [copy, untar], dest, None


def pull_once(tool: str, ctx: Context, label: str, round_no: int, keep: bool) -> Run:
    """One measured pull into a fresh folder, checked file by file, then removed
    (unless ``keep``) and the dirty pages written out before the next."""
    run_dir = ctx.work / "runs" / f"{label}-{tool}"
    run_dir.mkdir(parents=True)
    snap_before = process_snapshot()
    registry_before = process_cpu_seconds(ctx.registry_pid)
    busy_before = machine_busy_seconds()
    own_before = own_cpu_seconds()
    steps, landed, tool_seconds = (run_ours if tool == OURS else run_baseline)(ctx, run_dir)
    busy = machine_busy_seconds() - busy_before
    own = own_cpu_seconds() - own_before  # includes the tool: it was reaped meanwhile
    registry = process_cpu_seconds(ctx.registry_pid) - registry_before
    for command, seconds in other_load(snap_before, process_snapshot(), {os.getpid(), ctx.registry_pid}):
        ctx.others[command] = ctx.others.get(command, 0.0) + seconds
    verify_files(ctx.image.files, landed)
    if not keep:
        shutil.rmtree(run_dir)
    os.sync()
    wall = sum(s.wall_seconds for s in steps)
    cpu = sum(s.cpu_seconds for s in steps)
    total = ctx.image.image_bytes
    return Run(
        tool=tool,
        round=round_no,
        wall_seconds=round(wall, 4),
        mb_per_s=round(total / 1e6 / wall, 1),
        cpu_seconds=round(cpu, 3),
        cpu_seconds_per_gb=round(cpu / (total / 1e9), 3),
        peak_rss_mib=max(s.peak_rss_mib for s in steps),
        peak_pss_mib=max(s.peak_pss_mib for s in steps),
        processes=sum(s.processes for s in steps),
        registry_cpu_seconds=round(registry, 3),
        others_cpu_seconds=round(max(busy - own - registry, 0.0), 3),
        steps=steps,
        tool_seconds=tool_seconds,
        verified=True,
    )


def profile_ours(ctx: Context, out_raw: Path) -> dict[str, Any]:
    """One more (untimed) pull of ours under ``py-spy record``; where the samples fell."""
    run_dir = ctx.work / "runs" / "profile"
    run_dir.mkdir(parents=True)
    out_raw.parent.mkdir(parents=True, exist_ok=True)
    argv, env = ours_command(ctx, run_dir / "dest")
    log_path = run_dir / "output.log"
    measured = run_measured(
        py_spy_command(ctx.bench_venv, out_raw, argv), env, log_path, ctx.timeout, cwd=run_dir
    )
    if measured.exit_code != 0 or not out_raw.exists():
        return {"available": False, "reason": log_path.read_text(errors="replace")[-500:]}
    verify_files(ctx.image.files, Path(_pull_summary(log_path)["path"]))
    shutil.rmtree(run_dir)
    os.sync()
    return summarize_profile(out_raw, measured.wall_seconds)


# --- summary ----------------------------------------------------------------------------------


@dataclass
class ToolSummary:
    tool: str
    median_mb_per_s: float
    min_mb_per_s: float
    max_mb_per_s: float
    median_seconds: float
    #: median wall seconds of each step
    step_seconds: dict[str, float]
    peak_rss_mib: float
    peak_pss_mib: float
    median_cpu_seconds_per_gb: float
    #: median CPU seconds per GB of each step
    step_cpu_seconds_per_gb: dict[str, float]
    median_tool_seconds: float | None = None
    x_baseline: float | None = None
    runs: list[float] = field(default_factory=list)


def summarize(runs: Sequence[Run], image_bytes: int) -> list[ToolSummary]:
    summaries = []
    for tool in TOOLS:
        mine = [r for r in runs if r.tool == tool]
        if not mine:
            continue
        speeds = [r.mb_per_s for r in mine]
        names = [s.name for s in mine[0].steps]
        reported = [r.tool_seconds for r in mine if r.tool_seconds is not None]
        summaries.append(
            ToolSummary(
                tool=tool,
                median_mb_per_s=round(statistics.median(speeds), 1),
                min_mb_per_s=min(speeds),
                max_mb_per_s=max(speeds),
                median_seconds=round(statistics.median(r.wall_seconds for r in mine), 3),
                step_seconds={
                    n: round(
                        statistics.median(s.wall_seconds for r in mine for s in r.steps if s.name == n), 3
                    )
                    for n in names
                },
                peak_rss_mib=max(r.peak_rss_mib for r in mine),
                peak_pss_mib=max(r.peak_pss_mib for r in mine),
                median_cpu_seconds_per_gb=round(statistics.median(r.cpu_seconds_per_gb for r in mine), 2),
                step_cpu_seconds_per_gb={
                    n: round(
                        statistics.median(s.cpu_seconds for r in mine for s in r.steps if s.name == n)
                        / (image_bytes / 1e9),
                        2,
                    )
                    for n in names
                },
                median_tool_seconds=round(statistics.median(reported), 3) if reported else None,
                runs=speeds,
            )
        )
    base = next((s for s in summaries if s.tool == BASELINE), None)
    if base is not None:
        for s in summaries:
            s.x_baseline = round(s.median_mb_per_s / base.median_mb_per_s, 2)
    return summaries


def evaluate_target(summaries: Sequence[ToolSummary]) -> dict[str, Any]:
    """Issue 4: our median throughput at least the baseline's, every digest verified."""
    by_tool = {s.tool: s for s in summaries}
    ours, base = by_tool.get(OURS), by_tool.get(BASELINE)
    name = f"median throughput >= {BASELINE}'s, digests verified"
    if ours is None or base is None:
        return {"target": name, "measured": "not measured", "met": None}
    ratio = ours.median_mb_per_s / base.median_mb_per_s
    return {"target": name, "measured": f"{ratio:.2f}x", "met": ratio >= 1.0}


def format_table(summaries: Sequence[ToolSummary]) -> str:
    header = (
        f"{'tool':<16}{'median MB/s':>12}{'min':>8}{'max':>8}{'x base':>8}{'wall s':>8}"
        f"{'peak RSS MiB':>14}{'PSS MiB':>9}{'CPU s/GB':>10}   steps (median wall s, CPU s/GB)"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        x = f"{s.x_baseline:.2f}" if s.x_baseline is not None else "-"
        steps = ", ".join(
            f"{n} {sec:.2f}s {s.step_cpu_seconds_per_gb[n]:.2f}" for n, sec in s.step_seconds.items()
        )
        if s.median_tool_seconds is not None:
            steps += f" (own {s.median_tool_seconds:.2f}s)"
        lines.append(
            f"{s.tool:<16}{s.median_mb_per_s:>12.1f}{s.min_mb_per_s:>8.1f}{s.max_mb_per_s:>8.1f}{x:>8}"
            f"{s.median_seconds:>8.2f}{s.peak_rss_mib:>14.1f}{s.peak_pss_mib:>9.1f}"
            f"{s.median_cpu_seconds_per_gb:>10.2f}   {steps}"
        )
    return "\n".join(lines)


def markdown_report(data: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from a results file."""
    lines = [
        f"| tool | median MB/s | min - max | x {BASELINE} | median wall s | of which "
        "| peak RSS MiB | PSS MiB | CPU s/GB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in data["summary"]:
        x = f"{s['x_baseline']:.2f}" if s.get("x_baseline") is not None else "-"
        if s["tool"] == OURS:
            parts = f"own {s['median_tool_seconds']:.2f} s" if s.get("median_tool_seconds") else "-"
        else:
            parts = "; ".join(
                f"{n} {sec:.2f} s ({s['step_cpu_seconds_per_gb'][n]:.2f} CPU s/GB)"
                for n, sec in s["step_seconds"].items()
            )
        lines.append(
            f"| {s['tool']} | {s['median_mb_per_s']:.0f} | {s['min_mb_per_s']:.0f} - {s['max_mb_per_s']:.0f} "
            f"| {x} | {s['median_seconds']:.2f} | {parts} | {s['peak_rss_mib']:.0f} "
            f"| {s['peak_pss_mib']:.0f} | {s['median_cpu_seconds_per_gb']:.2f} |"
        )
    target = data["target"]
    marks = {True: "met", False: "**not met**", None: "not measured"}
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines.append(f"| {target['target']} | {target['measured']} | {marks[target['met']]} |")
    tools = [s["tool"] for s in data["summary"]]
    lines += ["", "| round | " + " | ".join(tools) + " |", "|---|" + "---:|" * len(tools)]
    for round_no in range(1, data["rounds"] + 1):
        cells = []
        for tool in tools:
            run = next(r for r in data["runs"] if r["tool"] == tool and r["round"] == round_no)
            cells.append(
                f"{run['mb_per_s']:.0f} MB/s, {run['wall_seconds']:.2f} s "
                f"(registry {run['registry_cpu_seconds']:.1f}, others {run['others_cpu_seconds']:.1f} CPU s)"
            )
        lines.append(f"| {round_no} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- plot (runs in the benchmark venv) ---------------------------------------------------------


def plot_child(results_path: Path, png: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    data = json.loads(results_path.read_text())
    summaries = data["summary"]
    runs = data["runs"]
    labels = [s["tool"].replace("+", "\n+ ") for s in summaries]
    xs = list(range(len(summaries)))
    fig, (ax_time, ax_rss, ax_cpu) = plt.subplots(
        1, 3, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2, 2]}
    )

    gigabytes = data["image"]["bytes"] / 1e9

    def median_run(tool: str, key: str) -> dict[str, Any]:
        """The run of ``tool`` whose ``key`` is the median (the lower one of two)."""
        mine = sorted((r for r in runs if r["tool"] == tool), key=lambda r: r[key])
        return dict(mine[(len(mine) - 1) // 2])

    def stacked(ax: Any, key: str, step_key: str, scale: float, unit: str) -> list[float]:
        """For each tool, its median run (by ``key``) as a bar of its steps stacked;
        returns the bar heights."""
        heights = []
        for x, s in zip(xs, summaries, strict=True):
            steps = median_run(s["tool"], key)["steps"]
            bottom = 0.0
            for step in steps:
                value = step[step_key] / scale
                ax.bar([x], [value], bottom=bottom, color=PLOT_COLORS.get(step["name"], "#555555"), width=0.6)
                if len(steps) > 1:
                    ax.annotate(
                        f"{step['name']}\n{value:.2f}{unit}",
                        (x, bottom + value / 2),
                        ha="center",
                        va="center",
                        fontsize=7,
                    )
                bottom += value
            heights.append(bottom)
        return heights

    stacked(ax_time, "wall_seconds", "wall_seconds", 1.0, " s")
    for x, s in zip(xs, summaries, strict=True):
        walls = [r["wall_seconds"] for r in runs if r["tool"] == s["tool"]]
        ax_time.scatter([x] * len(walls), walls, color="black", s=10, zorder=3)
        label = f"{s['median_seconds']:.2f} s, {s['median_mb_per_s']:.0f} MB/s"
        if s["tool"] != BASELINE and s.get("x_baseline") is not None:
            label += f"\n({s['x_baseline']:.2f}x {BASELINE})"
        ax_time.annotate(label, (x, max(walls)), textcoords="offset points", xytext=(0, 6), ha="center")
    ax_time.set_xticks(xs, labels)
    ax_time.set_ylabel("wall seconds: the median run by step; each round a dot")
    ax_time.set_ylim(0, max(r["wall_seconds"] for r in runs) * 1.35)
    ax_time.set_title("pull time (start-up included; lower is better)")

    rss = [s["peak_rss_mib"] for s in summaries]
    ax_rss.bar(
        xs, rss, color=[PLOT_COLORS.get(s["tool"], PLOT_COLORS[SKOPEO_STEP]) for s in summaries], width=0.6
    )
    for x, value in zip(xs, rss, strict=True):
        ax_rss.annotate(f"{value:.0f}", (x, value), textcoords="offset points", xytext=(0, 3), ha="center")
    ax_rss.set_xticks(xs, labels)
    ax_rss.set_ylabel("MiB, largest over the rounds (and steps)")
    ax_rss.set_ylim(0, max(rss) * 1.25)
    ax_rss.set_title("peak RSS of the process tree")

    totals = stacked(ax_cpu, "cpu_seconds", "cpu_seconds", gigabytes, "")
    for x, value in zip(xs, totals, strict=True):
        ax_cpu.annotate(f"{value:.2f}", (x, value), textcoords="offset points", xytext=(0, 3), ha="center")
    ax_cpu.set_xticks(xs, labels)
    ax_cpu.set_ylabel("CPU seconds per GB of image: the median run")
    ax_cpu.set_ylim(0, max(totals) * 1.25)
    ax_cpu.set_title("CPU per GB (registry not included)")

    image = data["image"]
    machine = data["machine"]
    rounds = data["rounds"]
    fig.suptitle(
        f"pull of a {image['bytes'] / MIB:.0f} MiB ModelCar image ({len(image['layers'])} layers) from "
        f"docker-registry on loopback, {rounds} round{'s' if rounds != 1 else ''} interleaved, "
        f"every file sha256-checked\n{data['date']}, {machine['nproc']} cores; other processes used "
        f"{machine['others_cpu_share'] * 100:.0f}% of the CPU during the rounds",
        fontsize=10,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pull a generated ModelCar image from a local docker-registry with our puller and with "
        "skopeo copy + untar, interleaved; check every file; report MB/s, peak RSS and CPU."
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the tools (default 3)")
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the work folder (pulled copies, logs, registry storage)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pull of each tool")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="one more pull of ours under py-spy: when it is slower than the baseline (auto, default), "
        "always, or never",
    )
    parser.add_argument(
        "--json", type=Path, help="results file (default benchmarks/results/oci_pull-DATE.json)"
    )
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help="plot file (default docs/img/oci_pull.png)"
    )
    parser.add_argument("--note", default="", help="free text stored with the results (what else ran)")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the docs tables of a results file and exit",
    )
    args = parser.parse_args(argv)
    if not 16 <= args.size_mib <= 8 * 1024:
        parser.error("--size-mib: between 16 and 8192")
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds: between 1 and 50")
    return args


def ensure_skopeo() -> Path:
    """``/usr/bin/skopeo``, installed with apt when missing (needs root)."""
    if SKOPEO.exists():
        return SKOPEO
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchmarkError(f"{SKOPEO} is missing and apt-get is not available")
    print("installing skopeo with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run([apt, "install", "-y", "skopeo"], env=env, check=False, timeout=900)
    if done.returncode != 0:
        subprocess.run([apt, "update"], env=env, check=True, timeout=900)
        subprocess.run([apt, "install", "-y", "skopeo"], env=env, check=True, timeout=900)
    if not SKOPEO.exists():
        raise BenchmarkError(f"apt installed skopeo but {SKOPEO} is missing")
    return SKOPEO


def versions() -> dict[str, str]:
    commit = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    registry = cmd_output(["dpkg-query", "-W", "-f", "${Version}", "docker-registry"])
    return {
        "puller": f"{commit}{' + uncommitted changes' if dirty else ''}",
        "skopeo": cmd_output([str(SKOPEO), "--version"]),
        "tar": (cmd_output(["tar", "--version"]).splitlines() or [""])[0],
        "gzip": (cmd_output(["gzip", "--version"]).splitlines() or [""])[0],
        "docker-registry": f"Debian package {registry}" if registry else "",
    }


@dataclass
class Measurements:
    runs: list[Run]
    load: dict[str, Any]


def measure(args: argparse.Namespace, ctx: Context) -> Measurements:
    """Warm-up, then the interleaved rounds."""
    busy_before = machine_busy_seconds()
    own_before = own_cpu_seconds() + process_cpu_seconds(ctx.registry_pid)
    clock_before = time.monotonic()
    if not args.no_warmup:
        for tool in TOOLS:
            warm = pull_once(tool, ctx, "warmup", 0, keep=False)
            print(f"  warm-up  {tool:<16}{warm.mb_per_s:>8.1f} MB/s (not counted)", flush=True)
    runs: list[Run] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(TOOLS)
        for tool in TOOLS[shift:] + TOOLS[:shift]:
            run = pull_once(tool, ctx, f"r{round_no}", round_no, keep=args.keep_data)
            runs.append(run)
            steps = (
                ", ".join(f"{s.name} {s.wall_seconds:.2f}s" for s in run.steps) if len(run.steps) > 1 else ""
            )
            print(
                f"  round {round_no}  {tool:<16}{run.mb_per_s:>8.1f} MB/s {run.wall_seconds:>7.2f}s  "
                f"RSS {run.peak_rss_mib:>6.1f} MiB  CPU {run.cpu_seconds:>5.2f}s  "
                f"(registry {run.registry_cpu_seconds:.2f}s, others {run.others_cpu_seconds:.2f}s)"
                + (f"  [{steps}]" if steps else ""),
                flush=True,
            )
    elapsed = time.monotonic() - clock_before
    others = max(
        machine_busy_seconds()
        - busy_before
        - (own_cpu_seconds() + process_cpu_seconds(ctx.registry_pid) - own_before),
        0.0,
    )
    load = {
        "rounds_seconds": round(elapsed, 1),
        "others_cpu_seconds": round(others, 1),
        "others_cpu_share": round(others / (elapsed * len(os.sched_getaffinity(0))), 3),
        "busiest_other_processes": [
            {"command": command, "cpu_seconds": round(seconds, 1)}
            for command, seconds in sorted(ctx.others.items(), key=lambda kv: -kv[1])[:8]
            if seconds >= 0.1
        ],
    }
    return Measurements(runs, load)


def print_report(results: dict[str, Any], summaries: Sequence[ToolSummary], plot_ok: bool, png: Path) -> None:
    machine = results["machine"]
    target = results["target"]
    print()
    print(format_table(summaries))
    marks = {True: "met", False: "NOT met", None: "-"}
    print(f"\ntarget: {target['target']}: {target['measured']}   {marks[target['met']]}")
    print(
        f"\nmachine: {machine['nproc']} cores, {machine['mem_total_mib']} MiB; load average "
        f"{machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; other processes used "
        f"{machine['others_cpu_share'] * 100:.0f}% of the CPU during the rounds"
    )
    profile = results.get("profile")
    if profile:
        if not profile.get("available"):
            print(f"\nprofile: not available ({profile.get('reason', '')[-300:]})")
        else:
            print(
                f"\nprofile of one more pull of {OURS} ({profile['wall_seconds']:.2f}s wall, "
                f"{profile['busy_thread_seconds']:.2f} busy thread-seconds), share of the busy samples:"
            )
            for title, name in (
                ("innermost frames", "top_leaves"),
                ("innermost frames of ours", "top_own_frames"),
            ):
                print(f"  {title}:")
                for item in profile[name][:10]:
                    print(f"    {item['share'] * 100:5.1f}%  {item['frame']}")
    print(f"\nresults: {results['results_path']}")
    print(f"plot:    {png}" + ("" if plot_ok else " (FAILED, see above)"))


def run_benchmark(args: argparse.Namespace) -> int:
    started_at = dt.datetime.now(dt.UTC)
    results_path: Path = args.json or DEFAULT_RESULTS_DIR / f"oci_pull-{started_at:%Y-%m-%d}.json"
    ensure_skopeo()
    _tests_servers()
    from tests.servers.registry import DistributionRegistry, ensure_registry

    ensure_registry()
    bench_venv = ensure_bench_venv()
    image = ensure_image(args.size_mib)
    machine = machine_info()
    profile: dict[str, Any] | None = None
    with work_folder(args.keep_data) as work:
        registry = DistributionRegistry(work / "registry")
        registry.start()
        try:
            push_seconds = push_image(registry.url, image)
            ctx = Context(image, work, bench_venv, registry.host, registry_pid(), 60.0 + args.size_mib * 0.5)
            print(
                f"image: {image.image_bytes / MIB:.0f} MiB in {len(image.layers)} layers, model "
                f"{image.model_bytes / MIB:.0f} MiB in {len(image.files)} files; docker-registry on "
                f"{registry.url} (pid {ctx.registry_pid}); push took {push_seconds:.1f}s",
                flush=True,
            )
            measured = measure(args, ctx)
            summaries = summarize(measured.runs, image.image_bytes)
            target = evaluate_target(summaries)
            if args.profile == "always" or (args.profile == "auto" and target["met"] is False):
                print(f"  profiling one more pull of {OURS} ...", flush=True)
                profile = profile_ours(ctx, results_path.with_suffix(".profile.txt"))
        finally:
            registry.stop()
    results: dict[str, Any] = {
        "date": f"{started_at:%Y-%m-%d %H:%M} UTC",
        "command": shlex.join([".venv/bin/python", "benchmarks/oci_pull.py", *sys.argv[1:]]),
        "note": args.note,
        "image": {
            "reference": f"{REPOSITORY}:{TAG}",
            "bytes": image.image_bytes,
            "model_bytes": image.model_bytes,
            "model_files": len(image.files),
            "size_mib": image.size_mib,
            "layers": [
                {"media_type": lay.media_type, "size": lay.size, "files": len(lay.paths)}
                for lay in image.layers
            ],
            "push_seconds": round(push_seconds, 1),
        },
        "versions": versions(),
        "machine": {**machine, "loadavg_end": os.getloadavg(), **measured.load},
        "rounds": args.rounds,
        "settings": {"PULL_WORKERS": "default", "PULL_PART_BYTES": "default"},
        "summary": [dataclasses.asdict(s) for s in summaries],
        "runs": [dataclasses.asdict(r) for r in measured.runs],
        "target": target,
        "profile": profile,
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    results["results_path"] = str(results_path)
    plot = subprocess.run(
        [
            str(bench_venv / "bin" / "python"),
            str(Path(__file__).resolve()),
            "_plot",
            str(results_path),
            str(args.plot),
        ],
        env=base_env(),
        check=False,
        timeout=300,
    )
    print_report(results, summaries, plot.returncode == 0, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_plot"]:
        plot_child(Path(argv[1]), Path(argv[2]))
        return 0
    args = parse_args(argv)
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0
    # a SIGTERM unwinds like Ctrl-C: the running tool and the registry are stopped by PID
    signal.signal(signal.SIGTERM, lambda _signo, _frame: sys.exit(143))
    try:
        return run_benchmark(args)
    except BenchmarkError as exc:
        print(f"oci_pull: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
