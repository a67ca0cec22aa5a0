"""``mesh-adapter``: serve mmesh.ModelRuntime in front of one model server.

The runtime is chosen by ``--runtime NAME`` or, for the drop-in commands
``/opt/app/<name>-adapter``, by the name the program was started under. Every other
setting comes from the upstream environment variables (see ``adapter.settings``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

from adapter.errors import ConfigurationError, SidecarError
from adapter.logs import configure_logging
from adapter.plugin import available_runtimes, load_runtime_class
from adapter.settings import Settings

log = structlog.get_logger(__name__)


def runtime_from_program_name(argv0: str) -> str | None:
    """``/opt/app/triton-adapter`` -> ``triton``; None for any other name."""
    name = Path(argv0).name
    if name.endswith("-adapter") and name != "mesh-adapter":
        return name[: -len("-adapter")]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh-adapter",
        description="Serve the ModelMesh mmesh.ModelRuntime API in front of a model server.",
    )
    parser.add_argument("--runtime", help=f"runtime plugin (installed: {', '.join(available_runtimes())})")
    parser.add_argument("--port", type=int, help="override ADAPTER_PORT (and ADAPTER_ENDPOINT)")
    parser.add_argument("--endpoint", help="override ADAPTER_ENDPOINT: port:N or unix:/path")
    parser.add_argument("--host", help="override ADAPTER_HOST")
    parser.add_argument("--log-level", help="override LOG_LEVEL")
    return parser


async def run(settings: Settings, runtime: str) -> None:
    """Start the adapter and serve until SIGTERM/SIGINT."""
    from adapter.flow import ModelFlow
    from adapter.server import AdapterServer, serve_until_signalled

    plugin_class = load_runtime_class(runtime)
    settings = settings.for_runtime(
        plugin_class.default_runtime_port, plugin_class.default_modelsize_multiplier
    )
    if settings.container_mem_req_bytes <= 0:
        raise ConfigurationError(
            "CONTAINER_MEM_REQ_BYTES must be set to the runtime container's memory request"
        )
    plugin = plugin_class(settings)
    await asyncio.to_thread(plugin.prepare)
    puller = None
    if settings.use_embedded_puller:
        from puller.pull import Puller

        puller = Puller(settings)
        await asyncio.to_thread(puller.start)
    await plugin.start()
    if settings.metrics_port > 0:
        from puller.metrics import start_metrics_server

        metrics_port = start_metrics_server(settings.metrics_port, settings.adapter_host)
        log.info("metrics served", port=metrics_port, path="/metrics")
    server = AdapterServer(settings, ModelFlow(settings, plugin, puller))

    async def stop() -> None:
        await server.stop()
        await plugin.close()
        if puller is not None:
            await asyncio.to_thread(puller.close)

    log.info(
        "starting adapter",
        runtime=runtime,
        runtime_port=settings.management_port,
        root_model_dir=str(settings.root_model_dir),
        embedded_puller=settings.use_embedded_puller,
    )
    await serve_until_signalled(server.start, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # the command line wins over the environment: --port over ADAPTER_ENDPOINT too
        endpoint = args.endpoint or (f"port:{args.port}" if args.port is not None else None)
        settings = Settings.from_env(
            adapter_port=args.port,
            adapter_endpoint=endpoint,
            adapter_host=args.host,
            log_level=args.log_level,
        )
    except SidecarError as exc:
        print(f"mesh-adapter: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    runtime = args.runtime or runtime_from_program_name(sys.argv[0])
    if not runtime:
        print(
            f"mesh-adapter: choose a runtime with --runtime (installed: {', '.join(available_runtimes())})",
            file=sys.stderr,
        )
        return 2
    try:
        asyncio.run(run(settings, runtime))
    except SidecarError as exc:
        log.error("adapter failed", error=str(exc))  # noqa: TRY400 - our error, no traceback needed
        print(f"mesh-adapter: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
