"""Command line: ``evalsyncd run | sync --once | status | verify | runs ls|show | demo``. The only module that reads
config files, configures logging, installs signal handlers and starts event loops.

Exit status: 0 success; 1 failure (not everything mirrored, mismatches);
2 usage error (argparse); 78 configuration error (EX_CONFIG, so systemd's
``RestartPreventExitStatus=78`` stops a restart loop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from evalsyncd import __version__
from evalsyncd.config import Settings, load_settings
from evalsyncd.errors import ConfigError, StorageError
from evalsyncd.logs import configure_logging
from evalsyncd.sync.journal import JournalError
from evalsyncd.sync.service import Service, open_destination_storage
from evalsyncd.systemd import Notifier, watchdog_interval_s

__all__ = ["EX_CONFIG", "entrypoint", "main"]

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
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

    status = sub.add_parser(
        "status",
        help="each destination's state and backlog (reads the journal; safe while running)",
    )
    _add_common(status)
    status.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser(
        "verify", help="compare every local file with its remote object; exit 1 on mismatches"
    )
    _add_common(verify)
    verify.add_argument(
        "--destination",
        metavar="NAME",
        action="append",
        help="check only this destination (repeatable; default: all)",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object per mismatch")

    runs = sub.add_parser("runs", help="read evaluation runs from a directory, s3:// or gs://")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    runs_ls = runs_sub.add_parser("ls", help="list runs, newest first")
    runs_show = runs_sub.add_parser("show", help="one run: metadata, results, trajectory counts")
    for p in (runs_ls, runs_show):
        p.add_argument(
            "--config",
            metavar="PATH",
            help="TOML configuration; URI may then be a destination name (its client settings apply)",
        )
        p.add_argument(
            "uri", metavar="URI", help="a directory, s3://bucket/prefix or gs://bucket/prefix"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
    runs_show.add_argument("run_id", metavar="RUN_ID")
    runs_show.add_argument(
        "--trajectories",
        type=int,
        default=0,
        metavar="N",
        help="also print the first N of each benchmark",
    )

    demo = sub.add_parser(
        "demo", help="local S3 + GCS servers, a sample writer and the daemon, end to end"
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        metavar="SECONDS",
        help="how long the sample writer appends trajectories (default 6)",
    )
    demo.add_argument(
        "--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)"
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
    metrics_server = None
    on_upload = None
    if settings.metrics_address:
        from evalsyncd.metrics import Metrics, MetricsServer

        metrics = Metrics()
        on_upload = metrics.on_upload
    service = Service(
        settings, notify=notifier, watchdog_interval_s=watchdog_interval_s(), on_upload=on_upload
    )
    try:
        if settings.metrics_address:
            metrics.bind(service, loop)
            metrics_server = MetricsServer(metrics, settings.metrics_address)
        await service.run(stop, reload=lambda: _settings(config_args), reload_event=reload_event)
    finally:
        if metrics_server is not None:
            metrics_server.close()
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


def _status(settings: Settings, as_json: bool) -> int:
    from evalsyncd.status import collect_status, format_status

    report = collect_status(settings)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_status(report))
    return EX_OK


async def _verify(settings: Settings, names: list[str] | None, as_json: bool) -> int:
    from evalsyncd.verify import FileCheck, verify_storage

    known = {d.name: d for d in settings.destinations}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        print(
            f"evalsyncd: unknown destination {', '.join(unknown)}; configured: {', '.join(known)}",
            file=sys.stderr,
        )
        return EX_USAGE
    failed = False
    for name in names or list(known):
        dest = known[name]

        def show(check: FileCheck, name: str = name) -> None:
            if check.ok:
                return
            if as_json:
                print(json.dumps({"destination": name, **check.__dict__}), flush=True)
            else:
                size = "-" if check.remote_size is None else check.remote_size
                print(
                    f"MISMATCH {name} {check.path}: {check.problem}: {check.detail} "
                    f"(local {check.local_size} B, remote {size} B)",
                    flush=True,
                )

        storage = open_destination_storage(dest)
        try:
            async with storage:
                report = await verify_storage(
                    storage,
                    settings.root,
                    name=name,
                    exclude=(settings.state_dir,),
                    max_concurrency=dest.max_concurrency,
                    on_check=show,
                )
        except StorageError as exc:
            print(f"evalsyncd: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed = True
            continue
        for warning in report.warnings:
            print(f"warning {name} {warning}", file=sys.stderr)
        methods = ", ".join(f"{n} by {m}" for m, n in sorted(report.methods.items()))
        verdict = "OK" if report.ok else f"{len(report.mismatches)} MISMATCHES"
        print(
            f"{name} ({report.url}): {report.checked} files checked ({methods or 'none'}): {verdict}",
            file=sys.stderr if as_json else sys.stdout,
        )
        failed = failed or not report.ok
    return EX_FAILURE if failed else EX_OK


def _runs(args: argparse.Namespace) -> int:
    from evalsyncd.runs import format_run, format_runs, run_details, runs_table
    from evalsyncd.storage import storage_from_uri
    from evalsyncd.store import EvalStore

    configure_logging("auto", "warning")
    storage = None
    if args.config or "://" not in args.uri:
        try:
            settings = load_settings(args.config) if args.config else None
        except ConfigError as exc:
            print(f"evalsyncd: configuration error:\n{exc}", file=sys.stderr)
            return EX_CONFIG
        for dest in settings.destinations if settings else []:
            if args.uri == dest.name:
                storage = open_destination_storage(dest)
    if storage is None:
        storage = storage_from_uri(args.uri)
    try:
        with storage:
            store = EvalStore(storage)
            if args.runs_command == "ls":
                runs = runs_table(store)
                print(json.dumps(runs, indent=2) if args.json else format_runs(runs))
            else:
                details = run_details(store, args.run_id, trajectories=args.trajectories)
                print(json.dumps(details, indent=2) if args.json else format_run(details))
    except (StorageError, FileNotFoundError, ValueError) as exc:
        print(f"evalsyncd: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_FAILURE
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "runs":
        return _runs(args)
    if args.command == "demo":
        from evalsyncd.demo import run_demo

        return run_demo(seconds=args.seconds, keep=Path(args.keep) if args.keep else None)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"evalsyncd: configuration error:\n{exc}", file=sys.stderr)
        return EX_CONFIG
    quiet = args.command in ("status", "verify")
    configure_logging(settings.log_format, "warning" if quiet else settings.log_level)
    try:
        if args.command == "run":
            return asyncio.run(_run_daemon(settings, args))
        if args.command == "sync":
            return asyncio.run(_sync_once(settings, args.timeout))
        if args.command == "status":
            return _status(settings, args.json)
        if args.command == "verify":
            return asyncio.run(_verify(settings, args.destination, args.json))
    except JournalError as exc:
        print(f"evalsyncd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
