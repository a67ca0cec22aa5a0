"""``mesh-puller``: pull one model (``pull URI DEST``) or run the standalone puller
(``serve``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from adapter.errors import SidecarError
from adapter.logs import configure_logging
from adapter.settings import Settings

log = structlog.get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh-puller", description="Pull models the way the sidecar does.")
    sub = parser.add_subparsers(dest="command", required=True)
    pull = sub.add_parser("pull", help="pull one model into DEST and exit")
    pull.add_argument(
        "uri", help="storage URI: s3://bucket/path, gs://, pvc://name/path, http(s)://, file://"
    )
    pull.add_argument(
        "dest",
        type=Path,
        help="model directory to create (must not exist or be empty); the model lands at "
        "DEST/<last part of the path>, as the sidecar places it under ROOT_MODEL_DIR/<modelId>/",
    )
    pull.add_argument("--storage-key", help="entry of the storage config to use (default: by type)")
    pull.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra storage param (dotted names reach nested fields); repeatable",
    )
    serve = sub.add_parser(
        "serve", help="run the standalone puller on PORT, forwarding to MODEL_SERVER_ENDPOINT"
    )
    serve.add_argument("--port", type=int, help="override PORT")
    parser.add_argument("--log-level", help="override LOG_LEVEL")
    return parser


async def _pull(settings: Settings, args: argparse.Namespace) -> dict[str, object]:
    from puller.model_key import ModelKey
    from puller.pull import Puller
    from puller.uri import params_for_uri

    params, path = params_for_uri(args.uri)
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SidecarError(f"--param {name or item!r}: expected NAME=VALUE")
        params[name] = value
    key = ModelKey(storage_key=args.storage_key, storage_params=params)
    puller = Puller(settings)
    try:
        stats = await puller.pull_into(key, path, args.dest)
    finally:
        puller.close()
    return stats


async def _serve(settings: Settings) -> None:
    from adapter.server import serve_until_signalled
    from puller.pull import Puller
    from puller.server import PullerServer

    puller = Puller(settings)
    await asyncio.to_thread(puller.start)
    if settings.metrics_port > 0:
        from puller.metrics import start_metrics_server

        metrics_port = start_metrics_server(settings.metrics_port, settings.adapter_host)
        log.info("metrics served", port=metrics_port, path="/metrics")
    server = PullerServer(settings, puller)

    async def stop() -> None:
        await server.stop()
        await asyncio.to_thread(puller.close)

    await serve_until_signalled(server.start, stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {"log_level": args.log_level}
        if args.command == "serve":
            overrides["puller_port"] = args.port
        elif args.command == "pull":
            dest = args.dest.absolute()
            # The pull stages inside DEST's parent, so that the final rename is atomic.
            overrides["root_model_dir"] = dest.parent
        settings = Settings.from_env(**overrides)
    except SidecarError as exc:
        print(f"mesh-puller: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "pull":
            stats = asyncio.run(_pull(settings, args))
            print(json.dumps(stats))
        else:
            asyncio.run(_serve(settings))
    except SidecarError as exc:
        print(f"mesh-puller: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
