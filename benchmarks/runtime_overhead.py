"""Real runtime overhead: loadModel of a small sklearn model through the sidecar against
the same load made directly on MLServer, in the same run.

One real MLServer 1.7 (``tests/servers/mlserver.py``, its own venv, 127.0.0.1, free
ports, stopped by PID) serves ``ROOT_MODEL_DIR/_mlserver_models``. One sidecar
(``mesh-adapter --runtime mlserver``, embedded puller) drives it. Each round, in an order
that rotates from round to round, every path loads then unloads a model under a name
never used before (so MLServer caches nothing):

* ``direct``: the benchmark places the model itself (``model.joblib`` copied into
  ``_mlserver_models/<name>/`` beside a ``model-settings.json``, untimed), then calls
  MLServer's own ``RepositoryModelLoad`` and ``RepositoryModelUnload`` over gRPC: the
  same calls the plugin makes. These two calls are "the runtime's own time".
* ``sidecar-pvc``: ``loadModel`` / ``unloadModel`` over gRPC to the sidecar, the model on
  a ``pvc`` storage entry: the puller links the folder in place, so the pull copies
  nothing (the model is already in place).
* ``sidecar-file``: the same from a ``file`` storage entry: the puller copies the model
  (one file of ~1 KB) into ``ROOT_MODEL_DIR/<modelId>``.

The pull is taken out with the sidecar's own figure: the puller logs ``model pulled``
with its ``seconds`` for each model id (JSON logs). Per round and sidecar path:
``overhead = (sidecar load - pull) - direct load`` of the same round; the headline is the
median of these paired differences, with a distribution-free 95% interval. The sidecar's
log timestamps also split each sidecar load into phases (gRPC in, before the pull, the
pull, layout + MLServer's load, response out).

Results: a table, ``benchmarks/results/runtime_overhead.json`` and
``docs/img/runtime_overhead.png``. ``--profile`` attaches ``py-spy record --gil`` (the
benchmark venv's) to the sidecar for extra sidecar-pvc pairs after the rounds: where the
sidecar holds the GIL. See ``benchmarks/README.md``.

Top-level imports are the standard library only: the plot step runs this file again
with the benchmark venv's Python.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from control_plane import commit  # noqa: E402 - after the path set-up
from pull_throughput import (  # noqa: E402
    PROFILE_RATE,
    ensure_bench_venv,
    machine_busy_seconds,
    machine_info,
    own_cpu_seconds,
    process_cpu_seconds,
    process_tree,
    summarize_profile,
)

DEFAULT_JSON = BENCH_DIR / "results" / "runtime_overhead.json"
DEFAULT_PLOT = ROOT / "docs" / "img" / "runtime_overhead.png"
PATHS = ("direct", "sidecar-pvc", "sidecar-file")
SIDECAR_PATHS = PATHS[1:]
MAX_ROUNDS = 500
MODEL_TYPE = "sklearn"
SKLEARN_IMPLEMENTATION = "mlserver_sklearn.SKLearnModel"
CONTAINER_MEM = 2 * 1024**3

#: the target of issue 7, benchmark 4: sidecar load minus the runtime's own load,
#: excluding the pull
TARGET_OVERHEAD_MS = 20.0

PLOT_COLORS = {"direct": "#7a7a7a", "sidecar-pvc": "#2a7ab0", "sidecar-file": "#8cbfe0"}
PHASES = ("grpc_in", "before_pull", "pull", "layout_and_runtime_load", "response_out")
PHASE_LABELS = {
    "grpc_in": "client to loadModel logged",
    "before_pull": "to pull start",
    "pull": "pull",
    "layout_and_runtime_load": "layout + MLServer load",
    "response_out": "model loaded logged to client",
}

#: what the sidecar's busy samples are grouped by (a sample counts for every group
#: one of its frames falls in): parts of a frame's text
PROFILE_GROUPS: dict[str, tuple[str, ...]] = {
    # grpc.aio runs each call in a task of its own: its frames are not under ours
    "gRPC calls to MLServer (our client and grpc.aio's call tasks)": (
        "(runtimes/kserve_v2.py)",
        "(grpc/aio/",
    ),
    "logging (structlog + logging)": ("(structlog/", "(logging/"),
    "thread hops (asyncio.to_thread and the pool)": ("(asyncio/threads.py)", "(concurrent/futures/"),
    "pull (Puller.pull)": ("Puller.pull (puller/pull.py)",),
    "layout of the view": ("MLServerPlugin.layout (runtimes/mlserver.py)",),
    "unload path (ModelFlow.unload)": ("ModelFlow.unload (adapter/flow.py)",),
}

#: the packages of our own code in the profile
OWN_PACKAGES = ("adapter", "puller", "runtimes")

METHOD = (
    "Each round: a new model name per path; order rotates per round. direct = MLServer's "
    "RepositoryModelLoad / RepositoryModelUnload over gRPC after the benchmark placed the files "
    "(placement untimed). sidecar-* = loadModel / unloadModel over gRPC to mesh-adapter "
    "--runtime mlserver with the embedded puller (pvc: linked in place, file: a copy). The pull "
    "is the puller's own 'model pulled' seconds from the sidecar's JSON log. overhead = "
    "(sidecar load - pull) - direct load of the same round; median of the paired differences."
)


class BenchmarkError(Exception):
    """The benchmark could not measure what it was asked to."""


# --- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..1); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median (order statistics of a binomial
    with p = 1/2): the k-th smallest and k-th largest value, k as large as the
    confidence allows. The extreme values when there are too few."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    k = 0
    cdf = 0.0
    for j in range(n):
        cdf += math.comb(n, j) / 2**n
        if cdf > alpha:
            break
        k = j + 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def describe(values_s: Sequence[float]) -> dict[str, float]:
    """p50, p90, mean, min, max in milliseconds of values in seconds."""
    ms = [v * 1000 for v in values_s]
    if not ms:
        return {}
    return {
        "p50": round(percentile(ms, 0.5), 2),
        "p90": round(percentile(ms, 0.9), 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


def describe_differences(values_ms: Sequence[float]) -> dict[str, float]:
    """Median (with its 95% interval), p10, p90 and mean of paired differences in ms."""
    if not values_ms:
        return {}
    low, high = median_interval(values_ms)
    return {
        "median": round(statistics.median(values_ms), 2),
        "ci95_low": round(low, 2),
        "ci95_high": round(high, 2),
        "p10": round(percentile(values_ms, 0.1), 2),
        "p90": round(percentile(values_ms, 0.9), 2),
        "mean": round(statistics.fmean(values_ms), 2),
    }


# --- the set-up ---------------------------------------------------------------------------


@dataclass
class Setup:
    """The files of one run under ``work``."""

    work: Path
    root: Path  # ROOT_MODEL_DIR
    repository: Path  # MLServer's repository, ROOT_MODEL_DIR/_mlserver_models
    model_file: Path  # the trained model.joblib
    config_dir: Path
    pvc_mounts: Path

    @classmethod
    def create(cls, work: Path) -> Setup:
        from tests.servers.models import SKLEARN_MODEL_FILE, make_sklearn_model

        root = work / "models"
        repository = root / "_mlserver_models"
        repository.mkdir(parents=True)
        pvc_mounts = work / "pvc_mounts"
        # the pvc "claim" holds the model; the file storage root holds a second copy
        trained = make_sklearn_model(pvc_mounts / "claim" / "iris")
        file_root = work / "file-storage"
        (file_root / "iris").mkdir(parents=True)
        shutil.copyfile(trained / SKLEARN_MODEL_FILE, file_root / "iris" / SKLEARN_MODEL_FILE)
        config_dir = work / "storage-config"
        config_dir.mkdir()
        (config_dir / "claim").write_text(json.dumps({"type": "pvc", "name": "claim"}))
        (config_dir / "local").write_text(json.dumps({"type": "file", "root": str(file_root)}))
        return cls(work, root, repository, trained / SKLEARN_MODEL_FILE, config_dir, pvc_mounts)

    def sidecar_env(self, runtime_port: int, log_level: str) -> dict[str, str]:
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        env.update(
            RUNTIME_PORT=str(runtime_port),
            ROOT_MODEL_DIR=str(self.root),
            STORAGE_CONFIG_DIR=str(self.config_dir),
            PVC_MOUNTS_DIR=str(self.pvc_mounts),
            USE_EMBEDDED_PULLER="true",
            CONTAINER_MEM_REQ_BYTES=str(CONTAINER_MEM),
            LOADTIME_TIMEOUT="120000",
            LOG_LEVEL=log_level,
            LOG_FORMAT="json",
            PYTHONPATH=str(ROOT),
        )
        return env


#: per sidecar path: the storage key and the model path in it
SIDECAR_SOURCES = {"sidecar-pvc": ("claim", "iris"), "sidecar-file": ("local", "iris")}


# --- one operation ------------------------------------------------------------------------


@dataclass
class Op:
    """One load + unload of one path in one round (seconds, wall clock in ``*_at``)."""

    round: int
    path: str
    position: int  # 0: first in its round
    model: str
    load_s: float
    unload_s: float
    load_started_at: float
    load_ended_at: float
    place_s: float | None = None  # direct: placing the files (untimed in load_s)
    cleanup_s: float | None = None  # direct: removing them after the unload
    sidecar_cpu_s: float = 0.0
    mlserver_cpu_s: float = 0.0
    phases_s: dict[str, float] = field(default_factory=dict)  # sidecar: from its log
    pull_s: float | None = None  # sidecar: the puller's own figure


class Clients:
    """The two gRPC clients of the benchmark process: MLServer's repository API and the
    sidecar's mmesh.ModelRuntime (both synchronous, same channel settings)."""

    def __init__(self, mlserver_port: int, sidecar_port: int) -> None:
        import grpc

        from protos.inference import grpc_service_pb2 as v2
        from protos.inference import grpc_service_pb2_grpc as v2_grpc
        from tests.servers.adapter import MeshClient

        self.v2 = v2
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{mlserver_port}", options=[("grpc.enable_http_proxy", 0)]
        )
        self.mlserver = v2_grpc.GRPCInferenceServiceStub(self.channel)
        self.mesh = MeshClient(sidecar_port)

    def close(self) -> None:
        self.channel.close()
        self.mesh.close()

    def mlserver_version(self) -> str:
        return str(self.mlserver.ServerMetadata(self.v2.ServerMetadataRequest(), timeout=10).version)

    def ready_on_mlserver(self, name: str) -> bool:
        response = self.mlserver.ModelReady(self.v2.ModelReadyRequest(name=name), timeout=10)
        return bool(response.ready)


def place_direct(setup: Setup, name: str) -> Path:
    """What a user of MLServer's repository API does first: the model's folder with its
    ``model-settings.json`` (written last, by a rename)."""
    folder = setup.repository / name
    folder.mkdir()
    shutil.copyfile(setup.model_file, folder / setup.model_file.name)
    settings = {"name": name, "implementation": SKLEARN_IMPLEMENTATION, "parameters": {"uri": str(folder)}}
    tmp = folder / ".model-settings.json.tmp"
    tmp.write_text(json.dumps(settings))
    tmp.replace(folder / "model-settings.json")
    return folder


class Measurer:
    """Runs the operations and accounts CPU to the sidecar and MLServer."""

    def __init__(self, setup: Setup, clients: Clients, sidecar_pid: int, mlserver_pid: int) -> None:
        self.setup = setup
        self.clients = clients
        self.sidecar_pid = sidecar_pid
        self.mlserver_pid = mlserver_pid
        self.mlserver_pids = process_tree(mlserver_pid)

    def refresh_tree(self) -> None:
        self.mlserver_pids = process_tree(self.mlserver_pid)

    def _cpu(self) -> tuple[float, float]:
        return (
            process_cpu_seconds(self.sidecar_pid),
            sum(process_cpu_seconds(pid) for pid in self.mlserver_pids),
        )

    def run(self, path: str, round_no: int, position: int, label: str) -> Op:
        if path == "direct":
            return self._direct(round_no, position, label)
        return self._sidecar(path, round_no, position, label)

    def _direct(self, round_no: int, position: int, label: str) -> Op:
        v2 = self.clients.v2
        name = f"{label}-direct-{round_no}"
        t0 = time.perf_counter()
        folder = place_direct(self.setup, name)
        place = time.perf_counter() - t0
        cpu0 = self._cpu()
        at0 = time.time()
        t1 = time.perf_counter()
        self.clients.mlserver.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name=name), timeout=120)
        t2 = time.perf_counter()
        at1 = time.time()
        if not self.clients.ready_on_mlserver(name):
            raise BenchmarkError(f"{name}: MLServer does not report it ready after the load")
        t3 = time.perf_counter()
        self.clients.mlserver.RepositoryModelUnload(
            v2.RepositoryModelUnloadRequest(model_name=name), timeout=60
        )
        t4 = time.perf_counter()
        cpu1 = self._cpu()
        (folder / "model-settings.json").unlink()
        shutil.rmtree(folder)
        cleanup = time.perf_counter() - t4
        return Op(
            round=round_no,
            path="direct",
            position=position,
            model=name,
            load_s=t2 - t1,
            unload_s=t4 - t3,
            load_started_at=at0,
            load_ended_at=at1,
            place_s=place,
            cleanup_s=cleanup,
            sidecar_cpu_s=cpu1[0] - cpu0[0],
            mlserver_cpu_s=cpu1[1] - cpu0[1],
        )

    def _sidecar(self, path: str, round_no: int, position: int, label: str) -> Op:
        storage_key, model_path = SIDECAR_SOURCES[path]
        model_id = f"{label}-{path}-{round_no}"
        key = {"storage_key": storage_key, "model_type": {"name": MODEL_TYPE}}
        cpu0 = self._cpu()
        at0 = time.time()
        t1 = time.perf_counter()
        self.clients.mesh.load(model_id, model_path, key, model_type=MODEL_TYPE)
        t2 = time.perf_counter()
        at1 = time.time()
        if not self.clients.ready_on_mlserver(model_id):
            raise BenchmarkError(f"{model_id}: MLServer does not report it ready after loadModel")
        t3 = time.perf_counter()
        self.clients.mesh.unload(model_id)
        t4 = time.perf_counter()
        cpu1 = self._cpu()
        return Op(
            round=round_no,
            path=path,
            position=position,
            model=model_id,
            load_s=t2 - t1,
            unload_s=t4 - t3,
            load_started_at=at0,
            load_ended_at=at1,
            sidecar_cpu_s=cpu1[0] - cpu0[0],
            mlserver_cpu_s=cpu1[1] - cpu0[1],
        )


# --- the sidecar's log --------------------------------------------------------------------


def _timestamp(line: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(line["timestamp"])).timestamp()


def attach_log_figures(ops: Sequence[Op], log_lines: Sequence[dict[str, Any]]) -> None:
    """Fill ``pull_s`` and ``phases_s`` of the sidecar operations from the sidecar's
    JSON log (``loadModel``, ``model pulled``, ``model loaded`` of each model id)."""
    events: dict[tuple[str, str], dict[str, Any]] = {}
    for line in log_lines:
        model_id, event = line.get("model_id"), line.get("event")
        if isinstance(model_id, str) and event in ("loadModel", "model pulled", "model loaded"):
            events.setdefault((model_id, str(event)), line)
    for op in ops:
        if op.path == "direct":
            continue
        received = events.get((op.model, "loadModel"))
        pulled = events.get((op.model, "model pulled"))
        loaded = events.get((op.model, "model loaded"))
        if received is None or pulled is None or loaded is None:
            raise BenchmarkError(f"{op.model}: the sidecar's log lacks its load lines")
        op.pull_s = float(pulled["seconds"])
        pull_end = _timestamp(pulled)
        pull_start = pull_end - op.pull_s
        op.phases_s = {
            "grpc_in": _timestamp(received) - op.load_started_at,
            "before_pull": pull_start - _timestamp(received),
            "pull": op.pull_s,
            "layout_and_runtime_load": _timestamp(loaded) - pull_end,
            "response_out": op.load_ended_at - _timestamp(loaded),
        }


# --- summary ------------------------------------------------------------------------------


def summarize(ops: Sequence[Op], paths: Sequence[str]) -> dict[str, Any]:
    by_path = {p: [o for o in ops if o.path == p] for p in paths}
    summary: dict[str, Any] = {}
    for path, items in by_path.items():
        if not items:
            continue
        entry: dict[str, Any] = {
            "n": len(items),
            "load_ms": describe([o.load_s for o in items]),
            "unload_ms": describe([o.unload_s for o in items]),
            "sidecar_cpu_ms_per_pair": round(sum(o.sidecar_cpu_s for o in items) * 1000 / len(items), 2),
            "mlserver_cpu_ms_per_pair": round(sum(o.mlserver_cpu_s for o in items) * 1000 / len(items), 2),
        }
        if path == "direct":
            entry["place_ms"] = describe([o.place_s or 0.0 for o in items])
            entry["cleanup_ms"] = describe([o.cleanup_s or 0.0 for o in items])
        else:
            entry["pull_ms"] = describe([o.pull_s or 0.0 for o in items])
            entry["load_minus_pull_ms"] = describe([o.load_s - (o.pull_s or 0.0) for o in items])
            entry["phases_ms_p50"] = {
                phase: round(statistics.median(o.phases_s[phase] for o in items) * 1000, 2)
                for phase in PHASES
            }
        summary[path] = entry
    return summary


def paired_overheads(ops: Sequence[Op], paths: Sequence[str]) -> dict[str, Any]:
    """Per sidecar path, the differences to ``direct`` of the same round (ms)."""
    direct = {o.round: o for o in ops if o.path == "direct"}
    out: dict[str, Any] = {}
    for path in paths:
        if path == "direct":
            continue
        pairs = [(o, direct[o.round]) for o in ops if o.path == path and o.round in direct]
        if not pairs:
            continue
        out[path] = {
            "pairs": len(pairs),
            "load_excluding_pull_ms": describe_differences(
                [(s.load_s - (s.pull_s or 0.0) - d.load_s) * 1000 for s, d in pairs]
            ),
            "load_including_pull_ms": describe_differences([(s.load_s - d.load_s) * 1000 for s, d in pairs]),
            "unload_ms": describe_differences([(s.unload_s - d.unload_s) * 1000 for s, d in pairs]),
            "per_round_load_excluding_pull_ms": [
                round((s.load_s - (s.pull_s or 0.0) - d.load_s) * 1000, 2) for s, d in pairs
            ],
        }
    return out


def evaluate_targets(overheads: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, entry in overheads.items():
        figure = entry["load_excluding_pull_ms"]
        out.append(
            {
                "what": f"{path}: load overhead beyond MLServer's own load, excluding the pull, "
                f"median < {TARGET_OVERHEAD_MS:g} ms",
                "value": figure["median"],
                "ci95": [figure["ci95_low"], figure["ci95_high"]],
                "met": figure["median"] < TARGET_OVERHEAD_MS,
            }
        )
    return out


# --- report -------------------------------------------------------------------------------


def format_report(data: dict[str, Any]) -> str:
    lines = [
        f"{'path':<13} {'n':>3} {'load p50':>9} {'p90':>8} {'mean':>8} {'unload p50':>11} {'p90':>8} "
        f"{'mean':>8} {'pull p50':>9} {'sc CPU/pr':>10} {'ml CPU/pr':>10}"
    ]
    for path, s in data["summary"].items():
        pull = s.get("pull_ms", {}).get("p50")
        lines.append(
            f"{path:<13} {s['n']:>3} {s['load_ms']['p50']:>9.2f} {s['load_ms']['p90']:>8.2f} "
            f"{s['load_ms']['mean']:>8.2f} {s['unload_ms']['p50']:>11.2f} {s['unload_ms']['p90']:>8.2f} "
            f"{s['unload_ms']['mean']:>8.2f} {'-' if pull is None else f'{pull:.2f}':>9} "
            f"{s['sidecar_cpu_ms_per_pair']:>10.1f} {s['mlserver_cpu_ms_per_pair']:>10.1f}"
        )
    lines.append("")
    lines.append("overhead = sidecar - direct, same round (ms): median [95% CI] p90")
    for path, o in data["overheads"].items():
        ex, inc, unl = o["load_excluding_pull_ms"], o["load_including_pull_ms"], o["unload_ms"]
        lines.append(
            f"  {path:<13} load excl. pull {ex['median']:.2f} [{ex['ci95_low']:.2f}, {ex['ci95_high']:.2f}] "
            f"p90 {ex['p90']:.2f}; incl. pull {inc['median']:.2f}; unload {unl['median']:.2f} "
            f"[{unl['ci95_low']:.2f}, {unl['ci95_high']:.2f}]"
        )
    return "\n".join(lines)


def markdown_report(data: dict[str, Any]) -> str:
    lines = [
        "| path | loads | load p50 ms | load p90 ms | load mean ms | unload p50 ms | unload p90 ms "
        "| unload mean ms | pull p50 ms | sidecar CPU ms/pair | MLServer CPU ms/pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, s in data["summary"].items():
        pull = s.get("pull_ms", {}).get("p50")
        lines.append(
            f"| {path} | {s['n']} | {s['load_ms']['p50']:.2f} | {s['load_ms']['p90']:.2f} | "
            f"{s['load_ms']['mean']:.2f} | {s['unload_ms']['p50']:.2f} | {s['unload_ms']['p90']:.2f} | "
            f"{s['unload_ms']['mean']:.2f} | {'-' if pull is None else f'{pull:.2f}'} | "
            f"{s['sidecar_cpu_ms_per_pair']:.1f} | {s['mlserver_cpu_ms_per_pair']:.1f} |"
        )
    lines += [
        "",
        "| sidecar minus direct, same round | median ms | 95% CI of the median | p10 ms | p90 ms | mean ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, o in data["overheads"].items():
        for key, what in (
            ("load_excluding_pull_ms", "load, excluding the pull"),
            ("load_including_pull_ms", "load, including the pull"),
            ("unload_ms", "unload"),
        ):
            x = o[key]
            lines.append(
                f"| {path}: {what} | {x['median']:.2f} | {x['ci95_low']:.2f} - {x['ci95_high']:.2f} | "
                f"{x['p10']:.2f} | {x['p90']:.2f} | {x['mean']:.2f} |"
            )
    sidecar_paths = [p for p in data["summary"] if p != "direct"]
    if sidecar_paths:
        lines += [
            "",
            "| phase of a sidecar load (median ms) | " + " | ".join(sidecar_paths) + " |",
            "|---|" + "---:|" * len(sidecar_paths),
        ]
        for phase in PHASES:
            values = " | ".join(f"{data['summary'][p]['phases_ms_p50'][phase]:.2f}" for p in sidecar_paths)
            lines.append(f"| {PHASE_LABELS[phase]} | {values} |")
    lines += ["", "| target | value ms | 95% CI | met |", "|---|---:|---:|---|"]
    for t in data["targets"]:
        lines.append(
            f"| {t['what']} | {t['value']} | {t['ci95'][0]} - {t['ci95'][1]} | "
            f"{'yes' if t['met'] else '**no**'} |"
        )
    profile = data.get("profile")
    if profile and profile.get("available"):
        lines += [
            "",
            f"`py-spy record --gil` of the sidecar over {profile['loads']} sidecar-pvc pairs: "
            f"{profile['samples']} samples, {profile['gil_ms_per_pair']} ms holding the GIL per pair.",
            "",
            "| samples on stacks through | share |",
            "|---|---:|",
        ]
        for group, share in profile["inclusive"]["groups"].items():
            lines.append(f"| {group} | {share * 100:.1f}% |")
        lines += ["", "| innermost frame | share |", "|---|---:|"]
        for f in profile["top_leaves"][:8]:
            lines.append(f"| `{f['frame']}` | {f['share'] * 100:.1f}% |")
    return "\n".join(lines)


def plot_child(results_path: Path, png: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    data = json.loads(results_path.read_text())
    ops = data["ops"]
    paths = [p for p in PATHS if p in data["summary"]]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.2))
    (ax_load, ax_unload), (ax_over, ax_phase) = axes
    for ax, key, title in (
        (ax_load, "load_s", "load latency per path"),
        (ax_unload, "unload_s", "unload latency per path"),
    ):
        series = [[o[key] * 1000 for o in ops if o["path"] == p] for p in paths]
        box = ax.boxplot(series, tick_labels=paths, showfliers=False, patch_artist=True, widths=0.5)
        for patch, path in zip(box["boxes"], paths, strict=True):
            patch.set_facecolor(PLOT_COLORS[path])
            patch.set_alpha(0.6)
        for i, values in enumerate(series, start=1):
            ax.scatter([i] * len(values), values, s=8, color="black", alpha=0.5, zorder=3)
            ax.annotate(
                f"p50 {statistics.median(values):.1f}",
                (i + 0.27, statistics.median(values)),
                va="center",
                fontsize=8,
            )
        # a rare stall (another process on the two cores) would flatten the boxes: clip
        top = max(percentile(v, 0.99) for v in series) * 1.3
        clipped = sum(x > top for v in series for x in v)
        ax.set_ylim(0, top)
        ax.set_ylabel("ms")
        above = f"{clipped} point{'s' if clipped > 1 else ''} above the axis"
        ax.set_title(f"{title} ({above})" if clipped else title)
    for path, entry in data["overheads"].items():
        values = entry["per_round_load_excluding_pull_ms"]
        ax_over.plot(
            range(1, len(values) + 1),
            values,
            marker="o",
            markersize=2.5,
            linewidth=0.6,
            color=PLOT_COLORS[path],
            label=f"{path}: median {entry['load_excluding_pull_ms']['median']:.1f} ms",
        )
    ax_over.axhline(TARGET_OVERHEAD_MS, color="red", linestyle="--", linewidth=1, label="target")
    ax_over.axhline(0, color="black", linewidth=0.5)
    ax_over.set_xlabel("round")
    ax_over.set_ylabel("ms")
    ax_over.set_title("overhead per round: (sidecar load - pull) - direct load")
    ax_over.legend(fontsize=8)
    # median phases of a sidecar load beside MLServer's own load
    bars = ["direct", *[p for p in paths if p != "direct"]]
    bottom = [0.0] * len(bars)
    colors = ["#bbbbbb", "#d9822b", "#6aa84f", "#2a7ab0", "#9b59b6"]
    direct_p50 = data["summary"]["direct"]["load_ms"]["p50"]
    ax_phase.bar([0], [direct_p50], 0.5, color="#7a7a7a", label="MLServer load (direct)")
    for phase, color in zip(PHASES, colors, strict=True):
        heights = [0.0] + [data["summary"][p]["phases_ms_p50"][phase] for p in bars[1:]]
        ax_phase.bar(range(len(bars)), heights, 0.5, bottom=bottom, color=color, label=PHASE_LABELS[phase])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax_phase.set_xticks(range(len(bars)), bars)
    ax_phase.set_ylabel("ms (medians of each phase)")
    ax_phase.set_title("where a load's time goes (sidecar log timestamps)")
    ax_phase.legend(fontsize=7, loc="upper left")
    machine = data["machine"]
    fig.suptitle(
        f"loadModel of a small sklearn model: sidecar vs MLServer {data['mlserver_version']} directly, "
        f"{data['rounds']} rounds; {data['date']}, {machine['nproc']} cores, "
        f"load average {machine['loadavg_start'][0]:.1f} at start",
        fontsize=10,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def draw_plot(results_path: Path, png: Path) -> None:
    venv = ensure_bench_venv()
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(Path(__file__).resolve()),
            "--plot-child",
            str(results_path),
            str(png),
        ],
        check=True,
    )


# --- profile ------------------------------------------------------------------------------


def profile_sidecar(
    measurer: Measurer, sidecar_pid: int, loads: int, out_raw: Path, label: str
) -> dict[str, Any]:
    """``py-spy record`` attached to the sidecar (busy threads only) while it serves
    ``loads`` sidecar-pvc load/unload pairs; where the samples fell."""
    venv = ensure_bench_venv()
    out_raw.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        str(venv / "bin" / "py-spy"),
        "record",
        "--pid",
        str(sidecar_pid),
        "--rate",
        str(PROFILE_RATE),
        "--gil",
        "--format",
        "raw",
        "--output",
        str(out_raw),
    ]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    started = time.perf_counter()
    for i in range(loads):
        measurer.run("sidecar-pvc", i, 0, label)
    wall = time.perf_counter() - started
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not out_raw.exists():
        return {"available": False, "reason": err.decode(errors="replace")[-500:]}
    summary = summarize_profile(out_raw, wall, packages=OWN_PACKAGES)
    summary["loads"] = loads
    summary["mode"] = "py-spy record --gil: samples of the thread holding the GIL"
    summary["gil_ms_per_pair"] = round(summary["samples"] / PROFILE_RATE / max(loads, 1) * 1000, 2)
    summary["inclusive"] = inclusive_shares(out_raw)
    return summary


def inclusive_shares(out_raw: Path) -> dict[str, Any]:
    """Share of the samples whose stack holds a frame of each group (``PROFILE_GROUPS``),
    and the functions of our own code by the share of stacks they are on (``main``,
    on every stack of the event loop, left out)."""
    groups = dict.fromkeys(PROFILE_GROUPS, 0)
    own: dict[str, int] = {}
    total = 0
    for line in out_raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = {frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame for frame in stack.split(";")}
        for group, needles in PROFILE_GROUPS.items():
            if any(needle in frame for frame in frames for needle in needles):
                groups[group] += count
        for frame in frames:
            if any(f"({pkg}/" in frame for pkg in OWN_PACKAGES) and not frame.startswith("main ("):
                own[frame] = own.get(frame, 0) + count
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return {
        "groups": {g: round(n / max(total, 1), 3) for g, n in groups.items()},
        "own_frames": [{"frame": f, "share": round(n / max(total, 1), 3)} for f, n in ranked],
    }


# --- main ---------------------------------------------------------------------------------


def bounded_rounds(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ROUNDS:
        raise argparse.ArgumentTypeError(f"rounds must be between 1 and {MAX_ROUNDS}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=bounded_rounds, default=30, help=f"timed rounds (1-{MAX_ROUNDS})")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="direct plus sidecar-pvc and/or sidecar-file"
    )
    parser.add_argument("--time-cap", type=float, default=900.0, help="seconds of timed rounds at most")
    parser.add_argument("--log-level", default="info", help="the sidecar's LOG_LEVEL (info: as deployed)")
    parser.add_argument("--profile", action="store_true", help="py-spy on the sidecar after the rounds")
    parser.add_argument("--profile-loads", type=int, default=200, help="sidecar-pvc pairs under py-spy")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--keep-data", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON", help="print the tables and exit")
    parser.add_argument("--plot-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def rotated(paths: Sequence[str], by: int) -> list[str]:
    k = by % len(paths)
    return [*paths[k:], *paths[:k]]


def run_rounds(
    measurer: Measurer,
    paths: Sequence[str],
    rounds: int,
    label: str,
    time_cap: float,
    on_round: Callable[[], None],
) -> list[Op]:
    ops: list[Op] = []
    deadline = time.monotonic() + time_cap
    for r in range(rounds):
        if time.monotonic() > deadline:
            print(f"time cap reached after {r} rounds", flush=True)
            break
        for position, path in enumerate(rotated(paths, r)):
            ops.append(measurer.run(path, r, position, label))
        on_round()
    return ops


def run_benchmark(args: argparse.Namespace) -> int:
    from tests.servers.adapter import SidecarProcess
    from tests.servers.mlserver import MLServerProcess

    paths = [p for p in args.paths.split(",") if p]
    if "direct" not in paths or set(paths) - set(PATHS) or len(paths) < 2:
        raise SystemExit(f"--paths must hold direct and at least one of {', '.join(SIDECAR_PATHS)}")
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="runtime-overhead-"))
    setup = Setup.create(work)
    model_bytes = setup.model_file.stat().st_size
    mlserver = MLServerProcess(models_dir=setup.repository, workdir=work / "mlserver")
    sidecar: SidecarProcess | None = None
    clients: Clients | None = None
    profile: dict[str, Any] | None = None
    try:
        mlserver.start()
        sidecar = SidecarProcess.adapter(
            "mlserver", setup.sidecar_env(mlserver.grpc_port, args.log_level), work / "sidecar.log"
        )
        sidecar.start()
        clients = Clients(mlserver.grpc_port, sidecar.port)
        clients.mesh.wait_ready(timeout=60)
        measurer = Measurer(setup, clients, sidecar.process.pid, mlserver.pid)
        print(
            f"MLServer {clients.mlserver_version()} (pid {mlserver.pid}), sidecar pid {sidecar.process.pid}"
        )
        print(f"warm-up: {args.warmup} rounds", flush=True)
        run_rounds(measurer, paths, args.warmup, "warmup", args.time_cap, lambda: None)
        measurer.refresh_tree()  # MLServer's workers are up by now

        def servers_and_client_cpu() -> float:
            return (
                process_cpu_seconds(sidecar.process.pid)
                + sum(process_cpu_seconds(pid) for pid in measurer.mlserver_pids)
                + own_cpu_seconds()
            )

        busy0, started, cpu0 = machine_busy_seconds(), time.perf_counter(), servers_and_client_cpu()
        done = [0]

        def progress() -> None:
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == args.rounds:
                print(f"  {done[0]}/{args.rounds} rounds", flush=True)

        ops = run_rounds(measurer, paths, args.rounds, "r", args.time_cap, progress)
        seconds = time.perf_counter() - started
        ours = servers_and_client_cpu() - cpu0
        others_share = max(0.0, machine_busy_seconds() - busy0 - ours) / (seconds * machine["nproc"])
        version = clients.mlserver_version()
        if args.profile:
            raw = args.json.with_suffix(".profile.txt")
            print(f"profiling the sidecar over {args.profile_loads} sidecar-pvc pairs ...", flush=True)
            profile = profile_sidecar(measurer, sidecar.process.pid, args.profile_loads, raw, "profile")
        leftovers = sorted(p.name for p in setup.repository.iterdir())
        attach_log_figures(ops, sidecar.log_lines())
    finally:
        if clients is not None:
            clients.close()
        if sidecar is not None:
            sidecar.stop()
        mlserver.stop()
        if args.keep_data:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    summary = summarize(ops, paths)
    overheads = paired_overheads(ops, paths)
    data: dict[str, Any] = {
        "benchmark": "runtime_overhead",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "mlserver_version": version,
        "rounds": len({o.round for o in ops}),
        "warmup": args.warmup,
        "sidecar_log_level": args.log_level,
        "model_bytes": model_bytes,
        "method": METHOD,
        "machine": machine,
        "others_cpu_share": round(others_share, 3),
        "note": args.note,
        "repository_leftovers": leftovers,
        "summary": summary,
        "overheads": overheads,
        "targets": evaluate_targets(overheads),
        "profile": profile,
        "ops": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(o).items()} for o in ops],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1) + "\n")
    print()
    print(format_report(data))
    print(f"\nresults: {args.json}")
    for t in data["targets"]:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['what']}: {t['value']} ms (95% CI {t['ci95']})")
    if profile is not None and profile.get("available"):
        print(
            f"\nsidecar profile ({profile['mode']}): {profile['gil_ms_per_pair']} ms holding the GIL "
            "per load+unload pair; share of those samples on stacks through:"
        )
        for group, share in profile["inclusive"]["groups"].items():
            print(f"  {share * 100:5.1f}%  {group}")
        print("our functions by the share of samples on their stacks:")
        for f in profile["inclusive"]["own_frames"][:12]:
            print(f"  {f['share'] * 100:5.1f}%  {f['frame']}")
        print("innermost frames:")
        for f in profile["top_leaves"][:10]:
            print(f"  {f['share'] * 100:5.1f}%  {f['frame']}")
    if not args.no_plot:
        draw_plot(args.json, args.plot)
        print(f"plot: {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_child:
        plot_child(*args.plot_child)
        return 0
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
