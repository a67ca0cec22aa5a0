"""structlog set-up, done once per process.

JSON lines on stdout when stdout is not a terminal (a pod), the console renderer when it
is; ISO UTC timestamps; context variables merged so that ``model_id`` bound for a
request appears on every line about it. Standard-library loggers (grpc, botocore, ...)
go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain line writer, with the name the logger was asked for (what
    ``add_logger_name`` reads)."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _WriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self.file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self.file, str(args[0]) if args else "")


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the standard library logging for this process.

    Our own lines are rendered by structlog and written straight to stdout (no
    ``logging.LogRecord`` round trip: a load logs a few lines, and the control plane
    should not pay for a second formatting pipeline); standard-library loggers go
    through a handler that renders them with the same processors."""
    level_no = logging.getLevelNamesMapping()[level.upper()]
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        logger_factory=_WriteLoggerFactory(sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_no)
    # chatty libraries: their warnings matter, their debug lines do not
    for name in ("botocore", "boto3", "urllib3", "s3transfer", "watchdog", "asyncio"):
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))
