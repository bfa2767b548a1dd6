"""Logging setup: structlog, configured once, by the CLI only.

JSON lines when stderr is not a TTY (journald, files), readable console output
otherwise. stdlib ``logging`` records (from libraries, and from the store) go
through the same renderer. Credentials never reach the logs: the daemon logs
keys, URLs without query strings, and error messages; a processor also masks
anything that looks like a signed-URL query or an AWS secret.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Literal

import structlog

from evalsyncd.terminal import one_line, printable

__all__ = ["configure_logging"]

_SECRET_PATTERNS = (
    re.compile(r"(Bearer\s+)[A-Za-z0-9._\-~+/]+=*"),
    re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", re.IGNORECASE),
    re.compile(
        r"((?:aws_secret_access_key|secret|token|password|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+",
        re.IGNORECASE,
    ),
)


def _redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            for pattern in _SECRET_PATTERNS:
                value = pattern.sub(r"\1***", value)
            event_dict[key] = value
    return event_dict


def _escaped(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Console lines: the event (a library's formatted message may quote a local file name
    or a bucket's text) on one line, control characters shown escaped
    (:func:`~evalsyncd.terminal.one_line`), so that it can neither start a forged line nor
    send terminal escapes. The other values are printed with ``repr`` (the renderer's
    ``repr_native_str``), which escapes them. A traceback keeps its lines, with every
    other control character escaped (:func:`~evalsyncd.terminal.printable`: an
    exception's message may quote a file name too). JSON lines are escaped by the
    encoder."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = one_line(event)
    trace = event_dict.get("exception")
    if isinstance(trace, str):
        event_dict["exception"] = printable(trace)
    return event_dict


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
) -> None:
    """Configure structlog and stdlib logging for the process.

    Args:
        fmt: ``json``, ``console``, or ``auto`` (console on a TTY, else JSON).
        level: minimum level name (``debug``, ``info``, ``warning``, ``error``).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), repr_native_str=True)
    )
    last: list[Any] = [renderer] if use_json else [_escaped, renderer]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            *last,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
