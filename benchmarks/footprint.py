"""Footprint benchmark: idle memory, import time, and start to READY.

1. Idle: ``mesh-adapter --runtime mlserver`` (embedded puller off and on; no runtime
   listening, so it idles in STARTING after answering a few runtimeStatus calls) and
   ``mesh-puller serve`` (forwarding to a closed port), before any model. RSS, PSS,
   open fds and threads of the process, sampled after it settled.
2. Import: ``python -X importtime -c "import adapter.cli"`` (cumulative time and the
   heaviest modules), the wall time of ``python -c "import adapter.cli"`` against
   ``python -c pass``, and of ``mesh-adapter --help`` / ``mesh-puller --help``.
3. Start to READY: a real MLServer is started first (``tests/servers/mlserver.py``) and
   waited for; then ``mesh-adapter --runtime mlserver`` is started and polled with
   runtimeStatus every 10 ms; the time from its ``Popen`` to the first READY answer.

Results: a table, ``benchmarks/results/footprint-<date>.json`` and
``docs/img/footprint.png``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from control_plane import commit  # noqa: E402 - after the path set-up
from pull_throughput import ensure_bench_venv, free_port, machine_info, memory_kib  # noqa: E402

DEV_BIN = ROOT / ".venv" / "bin"
DEFAULT_RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PLOT = ROOT / "docs" / "img" / "footprint.png"
CONTAINER_MEM = 8 * 1024**3

#: the targets of issue 7
TARGET_IDLE_RSS_MIB = 80.0
TARGET_READY_SECONDS = 1.0


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(LOG_FORMAT="json", ADAPTER_HOST="127.0.0.1", CONTAINER_MEM_REQ_BYTES=str(CONTAINER_MEM))
    env.update(extra)
    return env


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} not open after {timeout:g}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def runtime_status(port: int, timeout: float = 0.5) -> int | None:
    """The status code one runtimeStatus answers, None when it does not answer."""
    import grpc

    from protos.mmesh import model_runtime_pb2 as pb
    from protos.mmesh import model_runtime_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = pb_grpc.ModelRuntimeStub(channel).runtimeStatus(
                pb.RuntimeStatusRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return int(response.status)


def idle(
    name: str, argv: list[str], env: dict[str, str], port: int, work: Path, settle: float
) -> dict[str, Any]:
    log = work / f"{name.replace(' ', '_')}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_port(port, process, 30)
        statuses = [runtime_status(port, 2) for _ in range(3)]
        time.sleep(settle)
        samples = []
        for _ in range(5):
            samples.append(memory_kib(process.pid))
            time.sleep(0.2)
        fds = sum(1 for _ in Path(f"/proc/{process.pid}/fd").iterdir())
        threads = sum(1 for _ in Path(f"/proc/{process.pid}/task").iterdir())
    finally:
        stop(process)
    return {
        "process": name,
        "rss_mib": round(max(s[0] for s in samples) / 1024, 1),
        "peak_rss_mib": round(max(s[1] for s in samples) / 1024, 1),
        "pss_mib": round(max(s[2] for s in samples) / 1024, 1),
        "fds": fds,
        "threads": threads,
        "runtime_status": statuses,
    }


def measure_idle(work: Path, settle: float) -> list[dict[str, Any]]:
    out = []
    closed = free_port()
    config = work / "storage-config"
    config.mkdir(exist_ok=True)
    for embedded in ("false", "true"):
        port = free_port()
        root = work / f"idle-root-{embedded}"
        env = base_env(
            {
                "ADAPTER_PORT": str(port),
                "RUNTIME_PORT": str(closed),
                "ROOT_MODEL_DIR": str(root),
                "STORAGE_CONFIG_DIR": str(config),
                "USE_EMBEDDED_PULLER": embedded,
            }
        )
        name = f"mesh-adapter --runtime mlserver (embedded puller {'on' if embedded == 'true' else 'off'})"
        out.append(
            idle(name, [str(DEV_BIN / "mesh-adapter"), "--runtime", "mlserver"], env, port, work, settle)
        )
    port = free_port()
    env = base_env(
        {
            "PORT": str(port),
            "MODEL_SERVER_ENDPOINT": f"127.0.0.1:{closed}",
            "ROOT_MODEL_DIR": str(work / "idle-root-puller"),
            "STORAGE_CONFIG_DIR": str(config),
        }
    )
    out.append(idle("mesh-puller serve", [str(DEV_BIN / "mesh-puller"), "serve"], env, port, work, settle))
    return out


def wall(argv: Sequence[str], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(list(argv), check=True, capture_output=True, timeout=60, env=base_env({}))
        times.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def measure_imports(repeats: int) -> dict[str, Any]:
    python = str(DEV_BIN / "python")
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", "import adapter.cli"],
        capture_output=True,
        text=True,
        check=True,
        env=base_env({}),
        timeout=60,
    )
    rows = []
    for line in proc.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            depth = (len(match.group(3)) - 1) // 2
            rows.append((int(match.group(1)), int(match.group(2)), depth, match.group(4)))
    total = next((cum for _self, cum, _d, name in rows if name == "adapter.cli"), 0)
    # the heaviest packages by cumulative time among those imported by our modules
    top_level = sorted(((cum, name) for _s, cum, depth, name in rows if depth <= 2), reverse=True)
    heaviest: list[dict[str, Any]] = []
    for cum, name in top_level:
        if name == "adapter.cli" or any(name.startswith(h["module"] + ".") for h in heaviest):
            continue
        heaviest.append({"module": name, "cumulative_ms": round(cum / 1000, 1)})
        if len(heaviest) == 10:
            break
    return {
        "importtime_adapter_cli_ms": round(total / 1000, 1),
        "modules_imported": len(rows),
        "heaviest": heaviest,
        "python_pass": wall([python, "-c", "pass"], repeats),
        "import_adapter_cli": wall([python, "-c", "import adapter.cli"], repeats),
        "mesh_adapter_help": wall([str(DEV_BIN / "mesh-adapter"), "--help"], repeats),
        "mesh_puller_help": wall([str(DEV_BIN / "mesh-puller"), "--help"], repeats),
    }


def measure_ready(work: Path, repeats: int) -> dict[str, Any]:
    from tests.servers.mlserver import MLServerProcess

    root = work / "ready-root"
    mlserver = MLServerProcess(models_dir=root / "_mlserver_models", workdir=work / "mlserver")
    started = time.monotonic()
    mlserver.start()
    mlserver_seconds = time.monotonic() - started
    runs: list[dict[str, float | None]] = []
    listenings: list[float] = []
    readies: list[float] = []
    try:
        for _ in range(repeats):
            port = free_port()
            env = base_env(
                {
                    "ADAPTER_PORT": str(port),
                    "RUNTIME_PORT": str(mlserver.grpc_port),
                    "ROOT_MODEL_DIR": str(root),
                    "STORAGE_CONFIG_DIR": str(work / "storage-config"),
                    "USE_EMBEDDED_PULLER": "true",
                }
            )
            with (work / "ready-adapter.log").open("ab") as out:
                t0 = time.monotonic()
                process = subprocess.Popen(
                    [str(DEV_BIN / "mesh-adapter"), "--runtime", "mlserver"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                wait_port(port, process, 30)
                listening = time.monotonic() - t0
                ready_at = None
                while time.monotonic() - t0 < 30:
                    if runtime_status(port) == 1:  # READY
                        ready_at = time.monotonic() - t0
                        break
                    time.sleep(0.01)
            finally:
                stop(process)
            listenings.append(listening)
            if ready_at is not None:
                readies.append(ready_at)
            runs.append(
                {"listening_s": round(listening, 3), "ready_s": round(ready_at, 3) if ready_at else None}
            )
    finally:
        mlserver.stop()
    return {
        "mlserver_start_s": round(mlserver_seconds, 1),
        "runs": runs,
        "median_ready_s": round(statistics.median(readies), 3) if readies else None,
        "median_listening_s": round(statistics.median(listenings), 3),
    }


def evaluate(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = [
        {
            "what": f"idle RSS of {x['process']} < {TARGET_IDLE_RSS_MIB:g} MiB",
            "value": x["rss_mib"],
            "met": x["rss_mib"] < TARGET_IDLE_RSS_MIB,
        }
        for x in data["idle"]
    ]
    ready = data.get("ready")
    if ready is not None and ready["median_ready_s"] is not None:
        out.append(
            {
                "what": f"start to READY (runtime up) < {TARGET_READY_SECONDS:g} s, median",
                "value": ready["median_ready_s"],
                "met": ready["median_ready_s"] < TARGET_READY_SECONDS,
            }
        )
    return out


def markdown_report(data: dict[str, Any]) -> str:
    lines = ["| process (idle, no model) | RSS MiB | PSS MiB | fds | threads |", "|---|---:|---:|---:|---:|"]
    for x in data["idle"]:
        lines.append(f"| `{x['process']}` | {x['rss_mib']} | {x['pss_mib']} | {x['fds']} | {x['threads']} |")
    imp = data["imports"]
    lines += [
        "",
        "| start-up step | median s | min s |",
        "|---|---:|---:|",
        f"| `python -c pass` | {imp['python_pass']['median_s']} | {imp['python_pass']['min_s']} |",
        f'| `python -c "import adapter.cli"` | {imp["import_adapter_cli"]["median_s"]} | '
        f"{imp['import_adapter_cli']['min_s']} |",
        *(
            f"| `{cmd} --help` | {imp[key]['median_s']} | {imp[key]['min_s']} |"
            for cmd, key in (("mesh-adapter", "mesh_adapter_help"), ("mesh-puller", "mesh_puller_help"))
        ),
    ]
    ready = data.get("ready")
    if ready is not None:
        lines.append(f"| `mesh-adapter` start to listening (MLServer up) | {ready['median_listening_s']} | |")
        lines.append(f"| `mesh-adapter` start to first READY (MLServer up) | {ready['median_ready_s']} | |")
    lines += [
        "",
        f"`-X importtime` of `import adapter.cli`: {imp['importtime_adapter_cli_ms']} ms cumulative, "
        f"{imp['modules_imported']} modules; heaviest: "
        + ", ".join(f"`{h['module']}` {h['cumulative_ms']} ms" for h in imp["heaviest"][:8]),
        "",
        "| target | value | met |",
        "|---|---:|---|",
    ]
    for t in data["targets"]:
        lines.append(f"| {t['what']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def plot_child(results_path: Path, png: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    data = json.loads(results_path.read_text())
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1]})
    names = [x["process"].replace(" --runtime", "\n--runtime").replace(" (", "\n(") for x in data["idle"]]
    rss = [x["rss_mib"] for x in data["idle"]]
    pss = [x["pss_mib"] for x in data["idle"]]
    xs = list(range(len(names)))
    ax_mem.bar([x - 0.2 for x in xs], rss, 0.4, color="#2a7ab0", label="RSS")
    ax_mem.bar([x + 0.2 for x in xs], pss, 0.4, color="#8cbfe0", label="PSS")
    for x, v in zip(xs, rss, strict=True):
        ax_mem.annotate(f"{v:.0f}", (x - 0.2, v), textcoords="offset points", xytext=(0, 3), ha="center")
    ax_mem.axhline(TARGET_IDLE_RSS_MIB, color="red", linestyle="--", linewidth=1)
    ax_mem.set_xticks(xs, names, fontsize=7)
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title(f"idle memory (target: RSS < {TARGET_IDLE_RSS_MIB:g} MiB)")
    ax_mem.legend(fontsize=8)
    imp = data["imports"]
    steps = [
        ("python -c pass", imp["python_pass"]["median_s"]),
        ("import adapter.cli", imp["import_adapter_cli"]["median_s"]),
        ("mesh-adapter --help", imp["mesh_adapter_help"]["median_s"]),
        ("mesh-puller --help", imp["mesh_puller_help"]["median_s"]),
    ]
    if data.get("ready") and data["ready"]["median_ready_s"] is not None:
        steps.append(("start to READY\n(MLServer up)", data["ready"]["median_ready_s"]))
    ax_time.barh(range(len(steps)), [s[1] for s in steps], color="#2a7ab0")
    for i, (_label, v) in enumerate(steps):
        ax_time.annotate(f"{v:.2f} s", (v, i), textcoords="offset points", xytext=(3, -3), fontsize=8)
    ax_time.axvline(TARGET_READY_SECONDS, color="red", linestyle="--", linewidth=1)
    ax_time.set_yticks(range(len(steps)), [s[0] for s in steps], fontsize=8)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("seconds, median")
    ax_time.set_title(f"start-up (target: READY < {TARGET_READY_SECONDS:g} s)")
    machine = data["machine"]
    fig.suptitle(
        f"sidecar footprint; {data['date']}, {machine['nproc']} cores, "
        f"load average {machine['loadavg_start'][0]:.1f} at start",
        fontsize=10,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Footprint of the sidecar: idle memory, imports, start to READY."
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each timed start-up step")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle before sampling memory")
    parser.add_argument("--no-ready", action="store_true", help="skip start to READY (needs MLServer)")
    parser.add_argument("--json", type=Path, help="results file")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON", help="print the tables and exit")
    parser.add_argument("--plot-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> int:
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="footprint-"))
    try:
        data: dict[str, Any] = {
            "benchmark": "footprint",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit(),
            "machine": machine,
            "note": args.note,
            "idle": measure_idle(work, args.settle),
            "imports": measure_imports(args.repeats),
            "ready": None if args.no_ready else measure_ready(work, args.repeats),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    data["targets"] = evaluate(data)
    json_path = args.json or DEFAULT_RESULTS_DIR / f"footprint-{dt.date.today().isoformat()}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    print(markdown_report(data))
    print(f"\nresults: {json_path}")
    if not args.no_plot:
        venv = ensure_bench_venv()
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                str(Path(__file__).resolve()),
                "--plot-child",
                str(json_path),
                str(args.plot),
            ],
            check=True,
        )
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
