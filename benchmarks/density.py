"""Density benchmark: one sidecar holding 20,000 tiny models (null runtime).

The sidecar runs as in ``control_plane.py`` (``embedded``: the null runtime and the
embedded puller copying a 4 KiB model from a ``file`` storage entry). The benchmark
loads ``--models`` models into it (``--concurrency`` callers, bounded by
``--time-cap``), then measures at that size: RSS, open fds, the latency of
runtimeStatus and of one more loadModel/unloadModel pair. Then it stops the sidecar and
starts it again with the runtime still holding every model (the null runtime is told
so by ``NULL_RUNTIME_PRELOADED``) and every model folder still on disk, and times the
start to the first READY, which comes after the purge of all of them.

Results: a table and ``benchmarks/results/density-<date>.json``. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from control_plane import Server, commit, start_server, wait_ready  # noqa: E402
from pull_throughput import machine_info, memory_kib  # noqa: E402

DEFAULT_RESULTS_DIR = BENCH_DIR / "results"

#: the targets of issue 7
TARGET_RSS_MIB = 250.0
TARGET_CALL_MS = 10.0
TARGET_RESTART_S = 30.0


def fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


async def load_many(stub: Any, server: Server, count: int, concurrency: int, time_cap: float) -> int:
    from protos.mmesh import model_runtime_pb2 as pb

    deadline = time.monotonic() + time_cap
    next_index = 0
    loaded = 0

    async def worker() -> None:
        nonlocal next_index, loaded
        while next_index < count and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            request = pb.LoadModelRequest(
                modelId=f"dense-{i}",
                modelPath=server.model_path,
                modelType="sklearn",
                modelKey=server.model_key,
            )
            await stub.loadModel(request, timeout=60)
            loaded += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return loaded


async def timed_calls(stub: Any, server: Server, repeats: int) -> dict[str, float]:
    from protos.mmesh import model_runtime_pb2 as pb

    status: list[float] = []
    load: list[float] = []
    unload: list[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        await stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=10)
        t1 = time.perf_counter()
        request = pb.LoadModelRequest(
            modelId=f"extra-{i}", modelPath=server.model_path, modelType="sklearn", modelKey=server.model_key
        )
        await stub.loadModel(request, timeout=10)
        t2 = time.perf_counter()
        await stub.unloadModel(pb.UnloadModelRequest(modelId=f"extra-{i}"), timeout=10)
        t3 = time.perf_counter()
        status.append(t1 - t0)
        load.append(t2 - t1)
        unload.append(t3 - t2)
    return {
        "runtime_status_median_ms": round(statistics.median(status) * 1000, 2),
        "runtime_status_max_ms": round(max(status) * 1000, 2),
        "load_median_ms": round(statistics.median(load) * 1000, 2),
        "load_max_ms": round(max(load) * 1000, 2),
        "unload_median_ms": round(statistics.median(unload) * 1000, 2),
        "unload_max_ms": round(max(unload) * 1000, 2),
    }


def sample(pid: int) -> dict[str, float]:
    rss, hwm, _pss = memory_kib(pid)
    return {"rss_mib": round(rss / 1024, 1), "peak_rss_mib": round(hwm / 1024, 1), "fds": fds(pid)}


async def fill(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ModelRuntimeStub(channel)
        await wait_ready(stub, 60)
        empty = sample(server.process.pid)
        empty_calls = await timed_calls(stub, server, args.repeats)
        started = time.perf_counter()
        loaded = await load_many(stub, server, args.models, args.concurrency, args.time_cap)
        fill_seconds = time.perf_counter() - started
        full = sample(server.process.pid)
        full_calls = await timed_calls(stub, server, args.repeats)
    return {
        "models_loaded": loaded,
        "fill_seconds": round(fill_seconds, 1),
        "loads_per_s": round(loaded / fill_seconds, 1),
        "empty": {**empty, **empty_calls},
        "full": {**full, **full_calls},
    }


async def first_ready(server: Server, started: float, within: float) -> float:
    import grpc

    from protos.mmesh import model_runtime_pb2 as pb
    from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ModelRuntimeStub(channel)
        while time.monotonic() - started < within:
            try:
                status = await stub.runtimeStatus(pb.RuntimeStatusRequest(), timeout=within)
                if status.status == pb.RuntimeStatusResponse.READY:
                    return time.monotonic() - started
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"not READY within {within:g}s")


def restart(server: Server, work: Path, loaded: int, within: float) -> dict[str, Any]:
    root = work / "embedded-models"
    folders_before = sum(1 for p in root.iterdir() if not p.name.startswith("_"))
    t0 = time.monotonic()
    server.stop()
    stop_seconds = time.monotonic() - t0
    started = time.monotonic()
    # the same port, root and storage config; the runtime still holds every model
    again = start_server(
        "embedded", work, port=server.port, reuse=True, extra_env={"NULL_RUNTIME_PRELOADED": str(loaded)}
    )
    try:
        ready = asyncio.run(first_ready(again, started, within))
        after = sample(again.process.pid)
    finally:
        again.stop()
    folders_after = sum(1 for p in root.iterdir() if not p.name.startswith("_"))
    return {
        "stop_seconds": round(stop_seconds, 2),
        "start_to_ready_seconds": round(ready, 2),
        "model_folders_before": folders_before,
        "model_folders_after": folders_after,
        "after_purge": after,
    }


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    full = data["fill"]["full"]
    out = [
        {
            "what": f"RSS at {data['fill']['models_loaded']} models < {TARGET_RSS_MIB:g} MiB",
            "value": full["rss_mib"],
            "met": full["rss_mib"] < TARGET_RSS_MIB,
        },
        {
            "what": f"runtimeStatus at that size < {TARGET_CALL_MS:g} ms (median)",
            "value": full["runtime_status_median_ms"],
            "met": full["runtime_status_median_ms"] < TARGET_CALL_MS,
        },
        {
            "what": f"loadModel at that size < {TARGET_CALL_MS:g} ms (median)",
            "value": full["load_median_ms"],
            "met": full["load_median_ms"] < TARGET_CALL_MS,
        },
    ]
    if data.get("restart"):
        value = data["restart"]["stop_seconds"] + data["restart"]["start_to_ready_seconds"]
        out.append(
            {
                "what": f"restart + purge < {TARGET_RESTART_S:g} s",
                "value": round(value, 2),
                "met": value < TARGET_RESTART_S,
            }
        )
    return out


def markdown_report(data: dict[str, Any]) -> str:
    fill = data["fill"]
    lines = [
        f"Filled with {fill['models_loaded']} models in {fill['fill_seconds']} s "
        f"({fill['loads_per_s']} loads/s at concurrency {data['concurrency']}).",
        "",
        "| state | RSS MiB | fds | runtimeStatus median / max ms | loadModel median / max ms "
        "| unloadModel median / max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in ("empty", "full"):
        x = fill[label]
        lines.append(
            f"| {label} | {x['rss_mib']} | {x['fds']} | {x['runtime_status_median_ms']} / "
            f"{x['runtime_status_max_ms']} | {x['load_median_ms']} / {x['load_max_ms']} | "
            f"{x['unload_median_ms']} / {x['unload_max_ms']} |"
        )
    r = data.get("restart")
    if r:
        lines += [
            "",
            f"Restart: stop {r['stop_seconds']} s, start to first READY (purge of "
            f"{fill['models_loaded']} runtime models and {r['model_folders_before']} folders) "
            f"{r['start_to_ready_seconds']} s; model folders left: {r['model_folders_after']}.",
        ]
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    for t in data["targets"]:
        lines.append(f"| {t['what']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="20,000 tiny models in one sidecar (null runtime).")
    parser.add_argument("--models", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-cap", type=float, default=600.0, help="seconds for the fill at most")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls at each size")
    parser.add_argument("--restart-within", type=float, default=120.0, help="seconds to wait for READY")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--note", default="")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON", help="print the tables and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_report(json.loads(args.markdown.read_text())))
        return 0
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="density-"))
    try:
        server = start_server("embedded", work)
        try:
            filled = asyncio.run(fill(server, args))
        except BaseException:
            server.stop()
            raise
        restarted = restart(server, work, filled["models_loaded"], args.restart_within)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    data: dict[str, Any] = {
        "benchmark": "density",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "machine": machine,
        "note": args.note,
        "concurrency": args.concurrency,
        "fill": filled,
        "restart": restarted,
    }
    data["targets"] = evaluate(data)
    json_path = args.json or DEFAULT_RESULTS_DIR / f"density-{dt.date.today().isoformat()}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown_report(data))
    print(f"\nresults: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
