"""Command line: ``evalsyncd run | sync --once | ...``. The only module that reads
config files, configures logging, installs signal handlers and starts event loops.

Exit status: 0 success; 1 failure (not everything mirrored, mismatches);
2 usage error (argparse); 78 configuration error (EX_CONFIG, so systemd's
``RestartPreventExitStatus=78`` stops a restart loop).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from evalsyncd import __version__
from evalsyncd.config import Settings, load_settings
from evalsyncd.errors import ConfigError
from evalsyncd.logs import configure_logging
from evalsyncd.sync.journal import JournalError
from evalsyncd.sync.service import Service
from evalsyncd.systemd import Notifier

__all__ = ["EX_CONFIG", "entrypoint", "main"]

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78

log = structlog.get_logger("evalsyncd.cli")


def _destinations_from_flags(urls: list[str]) -> list[dict[str, Any]]:
    names: dict[str, int] = {}
    out = []
    for url in urls:
        base = url.split("://", 1)[0] if "://" in url else "file"
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}-{names[base]}"
        if "://" not in url:
            from pathlib import Path

            url = Path(url).expanduser().absolute().as_uri()
        out.append({"name": name, "url": url})
    return out


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"root": args.root, "state_dir": args.state_dir}
    if args.to:
        overrides["destinations"] = _destinations_from_flags(args.to)
    return load_settings(args.config, **overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: $EVALSYNCD_CONFIG)"
    )
    p.add_argument("--root", metavar="DIR", help="directory to mirror (overrides the config)")
    p.add_argument(
        "--to",
        metavar="URL",
        action="append",
        help="destination URL: s3://bucket/prefix, gs://bucket/prefix or a directory (repeatable; replaces the config's)",
    )
    p.add_argument("--state-dir", metavar="DIR", help="journal directory (overrides the config)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``evalsyncd`` command."""
    parser = argparse.ArgumentParser(
        prog="evalsyncd",
        description="Mirror an EvalStore directory to S3 and GCS, uploading only what is new.",
    )
    parser.add_argument("--version", action="version", version=f"evalsyncd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (watch and mirror until stopped)")
    _add_common(run)

    sync = sub.add_parser(
        "sync", help="one catch-up pass, then exit (0 when everything is mirrored)"
    )
    _add_common(sync)
    sync.add_argument(
        "--once", action="store_true", required=True, help="required: run one pass and exit"
    )
    sync.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up after (default 600)",
    )
    return parser


async def _run_daemon(settings: Settings, config_args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_event.set)
    notifier = Notifier()
    service = Service(settings, notify=notifier)
    try:
        await service.run(stop, reload=lambda: _settings(config_args), reload_event=reload_event)
    finally:
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return EX_OK


async def _sync_once(settings: Settings, timeout_s: float) -> int:
    service = Service(settings)
    bar: Any = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, unit="file", desc="syncing", leave=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        ok = await service.sync_once(timeout_s=timeout_s, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    log.info("sync_once_finished", complete=ok)
    return EX_OK if ok else EX_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"evalsyncd: configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(settings.log_format, settings.log_level)
    try:
        if args.command == "run":
            return asyncio.run(_run_daemon(settings, args))
        if args.command == "sync":
            return asyncio.run(_sync_once(settings, args.timeout))
    except JournalError as exc:
        print(f"evalsyncd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
