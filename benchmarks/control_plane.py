"""Control-plane benchmark: loadModel/unloadModel pairs through the real gRPC server.

The sidecar runs in its own process as ``mesh-adapter`` with the null runtime
(``benchmarks/null_runtime.py``: loads instantly, keeps nothing on disk), so what is
measured is the sidecar: the grpc.aio server, the flow, and (``embedded``) the embedded
puller copying a tiny model (two files, 4 KiB) from a ``file`` storage entry, or
(``placed``, ``USE_EMBEDDED_PULLER=false``) a model folder placed beforehand under
``ROOT_MODEL_DIR``. Beside it, in the same run and with the same client code, a bare
grpc.aio server answering the same two RPCs with constant responses (``echo``): the
ceiling for a Python gRPC server on this machine.

The client (this process, grpc.aio, one channel) runs C workers, each doing
load+unload pairs of its own model ids, until ``--pairs`` pairs or ``--time-cap``
seconds, at each concurrency of ``--concurrency``. Reported: pairs/s, the latency of a
pair and of each call (p50/p99), the server's and the client's CPU seconds per pair,
and the CPU the rest of the machine used meanwhile.

Results: a table, ``benchmarks/results/control_plane-<date>.json`` and
``docs/img/control_plane.png``. See ``benchmarks/README.md``.

Top-level imports are the standard library only: the plot step runs this file again
with the benchmark venv's Python.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from pull_throughput import (  # noqa: E402 - after the path set-up
    ensure_bench_venv,
    free_port,
    machine_busy_seconds,
    machine_info,
    process_cpu_seconds,
)

DEV_PYTHON = ROOT / ".venv" / "bin" / "python"
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PLOT = ROOT / "docs" / "img" / "control_plane.png"
TARGETS = ("echo", "embedded", "placed")
MODEL_FILES = {"model-settings.json": 512, "model.bin": 3584}
CONTAINER_MEM = 8 * 1024**3

#: the targets of issue 7
TARGET_PAIRS_PER_S_C8 = 500.0
TARGET_P99_MS = 10.0
TARGET_ECHO_SHARE_C64 = 0.5

PLOT_COLORS = {"echo": "#7a7a7a", "embedded": "#2a7ab0", "placed": "#8cbfe0"}


class BenchmarkError(Exception):
    """The benchmark could not measure what it was asked to."""


# --- the servers ------------------------------------------------------------------------


def echo_server_child(port: int) -> None:
    """A bare grpc.aio server answering loadModel/unloadModel with constant responses."""
    import grpc

    from protos.mmesh import model_runtime_pb2 as pb
    from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

    class Echo(pb_grpc.ModelRuntimeServicer):  # type: ignore[misc]
        async def loadModel(self, request: Any, context: Any) -> Any:
            return pb.LoadModelResponse(sizeInBytes=5120, maxConcurrency=0)

        async def unloadModel(self, request: Any, context: Any) -> Any:
            return pb.UnloadModelResponse()

        async def runtimeStatus(self, request: Any, context: Any) -> Any:
            return pb.RuntimeStatusResponse(status=pb.RuntimeStatusResponse.READY)

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ModelRuntimeServicer_to_server(Echo(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def write_tiny_model(folder: Path) -> int:
    """The tiny model's files in ``folder``; returns their total size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in MODEL_FILES.items():
        (folder / name).write_bytes(os.urandom(size))
    return sum(MODEL_FILES.values())


@dataclass
class Server:
    target: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    model_path: str
    model_key: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def start_server(
    target: str,
    work: Path,
    port: int | None = None,
    reuse: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start one target's server on 127.0.0.1 (a free port unless ``port``) in its own
    process. ``reuse``: the model root and storage config of an earlier start stay."""
    port = port or free_port()
    log_path = work / f"{target}.log"
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    model_path = "tiny"
    model_key = "{}"
    if target == "echo":
        argv = [str(DEV_PYTHON), str(Path(__file__).resolve()), "--echo-server-port", str(port)]
    else:
        root = work / f"{target}-models"
        config = work / f"{target}-storage-config"
        source = work / "source"
        size = sum(MODEL_FILES.values())
        placed = root / "placed" / "tiny"
        if not reuse:
            root.mkdir(parents=True)
            config.mkdir(parents=True)
            write_tiny_model(source / "tiny")
            (config / "default").write_text(json.dumps({"type": "file", "root": str(source)}))
            if target == "placed":
                write_tiny_model(placed)
        if target == "placed":
            model_path = str(placed)
            # what the standalone puller passes on
            model_key = json.dumps({"disk_size_bytes": size})
        env.update(
            ADAPTER_HOST="127.0.0.1",
            ADAPTER_PORT=str(port),
            CONTAINER_MEM_REQ_BYTES=str(CONTAINER_MEM),
            ROOT_MODEL_DIR=str(root),
            STORAGE_CONFIG_DIR=str(config),
            USE_EMBEDDED_PULLER="true" if target == "embedded" else "false",
            LOG_FORMAT="json",
        )
        argv = [str(DEV_PYTHON), str(BENCH_DIR / "null_runtime.py")]
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra_env or {})
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Server(target, port, process, log_path, model_path, model_key)


# --- the client -------------------------------------------------------------------------


@dataclass
class Level:
    target: str
    concurrency: int
    pairs: int
    seconds: float
    errors: int
    capped: bool
    pairs_per_s: float
    pair_p50_ms: float
    pair_p99_ms: float
    load_p50_ms: float
    load_p99_ms: float
    unload_p50_ms: float
    unload_p99_ms: float
    server_cpu_ms_per_pair: float
    client_cpu_ms_per_pair: float
    others_cpu_share: float


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_ready(stub: Any, within: float) -> None:
    from protos.mmesh import model_runtime_pb2 as pb

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            status = await stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=2)
            if status.status == pb.RuntimeStatusResponse.READY:
                return
        except Exception:  # not up yet
            pass
        await asyncio.sleep(0.05)
    raise BenchmarkError("the server never answered READY")


async def run_pairs(
    stub: Any, server: Server, label: str, concurrency: int, pairs: int, time_cap: float
) -> tuple[list[float], list[float], list[float], int, bool]:
    """``concurrency`` workers doing load+unload pairs until ``pairs`` are done or
    ``time_cap`` seconds passed; per-pair and per-call latencies in seconds."""
    from protos.mmesh import model_runtime_pb2 as pb

    pair_lat: list[float] = []
    load_lat: list[float] = []
    unload_lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + time_cap
    next_index = 0

    async def worker(w: int) -> None:
        nonlocal next_index, errors
        while next_index < pairs and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            model_id = f"{label}-{w}-{i}"
            t0 = time.perf_counter()
            try:
                await stub.loadModel(
                    pb.LoadModelRequest(
                        modelId=model_id,
                        modelPath=server.model_path,
                        modelType="sklearn",
                        modelKey=server.model_key,
                    ),
                    timeout=30,
                )
                t1 = time.perf_counter()
                await stub.unloadModel(pb.UnloadModelRequest(modelId=model_id), timeout=30)
                t2 = time.perf_counter()
            except Exception:  # counted; the run then exits non-zero
                errors += 1
                continue
            load_lat.append(t1 - t0)
            unload_lat.append(t2 - t1)
            pair_lat.append(t2 - t0)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return pair_lat, load_lat, unload_lat, errors, next_index < pairs


async def measure_server(
    server: Server, levels: Sequence[int], pairs: int, time_cap: float, warmup: int
) -> list[Level]:
    import grpc

    from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

    results: list[Level] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ModelRuntimeStub(channel)
        await wait_ready(stub, 60)
        await run_pairs(stub, server, "warmup", 8, warmup, time_cap)
        for concurrency in levels:
            busy0, server0, client0 = (
                machine_busy_seconds(),
                process_cpu_seconds(server.process.pid),
                own_cpu(),
            )
            started = time.perf_counter()
            pair_lat, load_lat, unload_lat, errors, capped = await run_pairs(
                stub, server, f"c{concurrency}", concurrency, pairs, time_cap
            )
            seconds = time.perf_counter() - started
            server_cpu = process_cpu_seconds(server.process.pid) - server0
            client_cpu = own_cpu() - client0
            busy = machine_busy_seconds() - busy0
            done = max(1, len(pair_lat))
            others = max(0.0, busy - server_cpu - client_cpu) / (seconds * len(os.sched_getaffinity(0)))
            level = Level(
                target=server.target,
                concurrency=concurrency,
                pairs=len(pair_lat),
                seconds=round(seconds, 3),
                errors=errors,
                capped=capped,
                pairs_per_s=round(len(pair_lat) / seconds, 1),
                pair_p50_ms=round(percentile(pair_lat, 0.5) * 1000, 2),
                pair_p99_ms=round(percentile(pair_lat, 0.99) * 1000, 2),
                load_p50_ms=round(percentile(load_lat, 0.5) * 1000, 2),
                load_p99_ms=round(percentile(load_lat, 0.99) * 1000, 2),
                unload_p50_ms=round(percentile(unload_lat, 0.5) * 1000, 2),
                unload_p99_ms=round(percentile(unload_lat, 0.99) * 1000, 2),
                server_cpu_ms_per_pair=round(server_cpu * 1000 / done, 3),
                client_cpu_ms_per_pair=round(client_cpu * 1000 / done, 3),
                others_cpu_share=round(others, 3),
            )
            results.append(level)
            print(format_row(level), flush=True)
    return results


# --- report -----------------------------------------------------------------------------

HEADER = (
    f"{'target':<9} {'C':>3} {'pairs':>6} {'pairs/s':>8} {'pair p50':>9} {'pair p99':>9} "
    f"{'load p99':>9} {'unl. p99':>9} {'srv ms/pr':>9} {'cli ms/pr':>9} {'others':>7} {'err':>4}"
)


def format_row(level: Level) -> str:
    return (
        f"{level.target:<9} {level.concurrency:>3} {level.pairs:>6} {level.pairs_per_s:>8.0f} "
        f"{level.pair_p50_ms:>9.2f} {level.pair_p99_ms:>9.2f} {level.load_p99_ms:>9.2f} "
        f"{level.unload_p99_ms:>9.2f} {level.server_cpu_ms_per_pair:>9.2f} "
        f"{level.client_cpu_ms_per_pair:>9.2f} {level.others_cpu_share * 100:>6.0f}% "
        f"{level.errors:>4}{' capped' if level.capped else ''}"
    )


def find(levels: Sequence[dict[str, Any]], target: str, concurrency: int) -> dict[str, Any] | None:
    return next((x for x in levels if x["target"] == target and x["concurrency"] == concurrency), None)


def evaluate_targets(levels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    echo64 = find(levels, "echo", 64)
    for target in ("embedded", "placed"):
        c8 = find(levels, target, 8)
        if c8 is not None:
            out.append(
                {
                    "what": f"{target}: pairs/s at concurrency 8 >= {TARGET_PAIRS_PER_S_C8:g}",
                    "value": c8["pairs_per_s"],
                    "met": c8["pairs_per_s"] >= TARGET_PAIRS_PER_S_C8,
                }
            )
            out.append(
                {
                    "what": f"{target}: pair p99 at concurrency 8 < {TARGET_P99_MS:g} ms",
                    "value": c8["pair_p99_ms"],
                    "met": c8["pair_p99_ms"] < TARGET_P99_MS,
                }
            )
        c64 = find(levels, target, 64)
        if c64 is not None and echo64 is not None:
            share = c64["pairs_per_s"] / echo64["pairs_per_s"]
            out.append(
                {
                    "what": f"{target}: pairs/s at concurrency 64 >= {TARGET_ECHO_SHARE_C64:g} x echo",
                    "value": round(share, 3),
                    "met": share >= TARGET_ECHO_SHARE_C64,
                }
            )
    return out


def markdown_report(data: dict[str, Any]) -> str:
    lines = [
        "| server | concurrency | pairs | pairs/s | pair p50 ms | pair p99 ms | load p99 ms | unload p99 ms "
        "| server CPU ms/pair | client CPU ms/pair | others' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in data["levels"]:
        lines.append(
            f"| {x['target']} | {x['concurrency']} | {x['pairs']} | {x['pairs_per_s']:.0f} | "
            f"{x['pair_p50_ms']:.2f} | {x['pair_p99_ms']:.2f} | {x['load_p99_ms']:.2f} | "
            f"{x['unload_p99_ms']:.2f} | {x['server_cpu_ms_per_pair']:.2f} | "
            f"{x['client_cpu_ms_per_pair']:.2f} | {x['others_cpu_share'] * 100:.0f}% |"
        )
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['what']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def plot_child(results_path: Path, png: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    data = json.loads(results_path.read_text())
    levels = data["levels"]
    targets = [t for t in TARGETS if any(x["target"] == t for x in levels)]
    concurrencies = sorted({x["concurrency"] for x in levels})
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.4))
    width = 0.8 / max(1, len(targets))
    for k, target in enumerate(targets):
        xs = [i + (k - (len(targets) - 1) / 2) * width for i in range(len(concurrencies))]
        rates = [(find(levels, target, c) or {}).get("pairs_per_s", 0) for c in concurrencies]
        p99s = [(find(levels, target, c) or {}).get("pair_p99_ms", 0) for c in concurrencies]
        ax_rate.bar(xs, rates, width, color=PLOT_COLORS[target], label=target)
        ax_p99.bar(xs, p99s, width, color=PLOT_COLORS[target], label=target)
        for x, r in zip(xs, rates, strict=True):
            ax_rate.annotate(
                f"{r:.0f}", (x, r), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8
            )
        for x, p in zip(xs, p99s, strict=True):
            ax_p99.annotate(
                f"{p:.1f}", (x, p), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8
            )
    for ax in (ax_rate, ax_p99):
        ax.set_xticks(range(len(concurrencies)), [f"C={c}" for c in concurrencies])
        ax.legend(fontsize=8, loc="upper left")
    ax_rate.axhline(TARGET_PAIRS_PER_S_C8, color="red", linestyle="--", linewidth=1)
    ax_rate.set_ylabel("load+unload pairs per second")
    ax_rate.set_title(f"throughput (target at C=8: >= {TARGET_PAIRS_PER_S_C8:g})")
    ax_p99.axhline(TARGET_P99_MS, color="red", linestyle="--", linewidth=1)
    ax_p99.set_yscale("log")
    ax_p99.set_ylabel("p99 of a pair, ms (log)")
    ax_p99.set_title(f"latency (target: p99 < {TARGET_P99_MS:g} ms)")
    machine = data["machine"]
    fig.suptitle(
        f"mmesh.ModelRuntime loadModel+unloadModel, null runtime, {data['pairs']} pairs per level; "
        f"{data['date']}, {machine['nproc']} cores, load average {machine['loadavg_start'][0]:.1f} at start",
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


# --- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=2000, help="pairs per concurrency level")
    parser.add_argument("--concurrency", default="1,8,64", help="concurrency levels")
    parser.add_argument("--targets", default=",".join(TARGETS), help="servers: echo, embedded, placed")
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds per level at most")
    parser.add_argument("--warmup", type=int, default=200, help="untimed pairs per server first")
    parser.add_argument("--json", type=Path, help="results file")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--keep-data", action="store_true", help="keep the work folder (logs)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the work folder (ROOT_MODEL_DIR, the source models) is made; default: the temp dir",
    )
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON", help="print the tables and exit")
    parser.add_argument("--echo-server-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plot-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def filesystem_of(path: Path) -> str:
    """The type and options of the filesystem ``path`` is on, from /proc/mounts (the
    longest mount point above it), e.g. ``ext4 (rw,relatime,discard)``."""
    best = ("", "unknown", "")
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2], fields[3])
    return f"{best[1]} ({best[2]})" if best[2] else best[1]


def commit() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "adapter", "puller"], capture_output=True, text=True, check=False
    ).stdout
    return head.strip() + (" + uncommitted changes" if dirty.strip() else "")


def run_benchmark(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.concurrency.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}")
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="control-plane-", dir=args.work_dir))
    machine["work_dir"] = str(work)
    machine["work_filesystem"] = filesystem_of(work)
    print(f"work folder (ROOT_MODEL_DIR inside): {work} on {machine['work_filesystem']}", flush=True)
    results: list[Level] = []
    print(HEADER, flush=True)
    try:
        for target in targets:
            server = start_server(target, work)
            try:
                results += asyncio.run(measure_server(server, levels, args.pairs, args.time_cap, args.warmup))
            finally:
                server.stop()
    finally:
        if args.keep_data:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    level_dicts = [asdict(x) for x in results]
    data: dict[str, Any] = {
        "benchmark": "control_plane",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "pairs": args.pairs,
        "time_cap_s": args.time_cap,
        "model_bytes": sum(MODEL_FILES.values()),
        "machine": machine,
        "note": args.note,
        "levels": level_dicts,
        "targets": evaluate_targets(level_dicts),
    }
    json_path = args.json or DEFAULT_RESULTS_DIR / f"control_plane-{dt.date.today().isoformat()}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nresults: {json_path}")
    for t in data["targets"]:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['what']}: {t['value']}")
    if not args.no_plot:
        draw_plot(json_path, args.plot)
        print(f"plot: {args.plot}")
    return 1 if any(x.errors for x in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server_port:
        echo_server_child(args.echo_server_port)
        return 0
    if args.plot_child:
        plot_child(*args.plot_child)
        return 0
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
