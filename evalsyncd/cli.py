"""Command line: ``evalsyncd run | sync --once | status | verify | claim | runs ls|show|report|export | restore | view | demo``.

The only module that reads config files, configures logging, installs signal
handlers and starts event loops. Imports are per command: ``runs`` and
``restore`` load neither the daemon (``evalsyncd.sync``, watchdog, pydantic,
prometheus) nor a cloud SDK they do not use.

Exit status: 0 success; 1 failure (not everything mirrored, mismatches);
2 usage error (argparse); 78 configuration error or a journal that cannot be
used, for ``run``, ``sync`` and ``status`` alike (EX_CONFIG, so systemd's
``RestartPreventExitStatus=78`` stops a restart loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from evalsyncd import __version__
from evalsyncd.errors import ConfigError, StorageError
from evalsyncd.terminal import printable

if TYPE_CHECKING:
    from evalsyncd.config import Settings
    from evalsyncd.storage import Backend, Storage
    from evalsyncd.store import EvalStore
    from evalsyncd.verify import FileCheck

__all__ = ["EX_CONFIG", "EX_FAILURE", "EX_OK", "EX_USAGE", "build_parser", "entrypoint", "main"]

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_CONFIG = 78


def _destinations_from_flags(urls: list[str]) -> list[dict[str, Any]]:
    """``--to`` URLs as destination tables, named after their scheme (``s3``, ``s3-2``, ``file``);
    a directory path becomes a ``file:///`` URL. An invalid URL is left for the settings
    to reject (naming ``destinations.N.url``)."""
    from evalsyncd.storage.urls import parse_url

    names: dict[str, int] = {}
    out = []
    for url in urls:
        try:
            parsed = parse_url(url)
        except ValueError:
            base = "destination"
        else:
            base = parsed.scheme
            if parsed.bare:
                url = Path(url).expanduser().absolute().as_uri()
        names[base] = names.get(base, 0) + 1
        name = base if names[base] == 1 else f"{base}-{names[base]}"
        out.append({"name": name, "url": url})
    return out


def _settings(args: argparse.Namespace) -> Settings:
    from evalsyncd.config import load_settings

    overrides: dict[str, Any] = {"root": args.root, "state_dir": args.state_dir}
    if args.to:
        overrides["destinations"] = _destinations_from_flags(args.to)
    return load_settings(args.config, **overrides)


def _url_forms() -> str:
    """The URL forms the registry accepts, for help texts."""
    from evalsyncd.storage.urls import SCHEMES

    return ", ".join(s.form for s in SCHEMES.values()) + " or a directory"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: $EVALSYNCD_CONFIG)"
    )
    p.add_argument("--root", metavar="DIR", help="directory to mirror (overrides the config)")
    p.add_argument(
        "--to",
        metavar="URL",
        action="append",
        help=f"destination URL: {_url_forms()} (repeatable; replaces the config's)",
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
    for p in (run, sync):
        p.add_argument(
            "--adopt-root",
            action="store_true",
            help="the root is another directory than the one the journal mirrored, on "
            "purpose (moved, restored): record it, and mirror its deletions again",
        )
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

    evict = sub.add_parser(
        "evict",
        help="one retention round: evict runs every destination holds (see [retention])",
    )
    _add_common(evict)
    evict.add_argument(
        "--dry-run", action="store_true", help="list what would go and why; delete nothing"
    )
    evict.add_argument("--json", action="store_true", help="print JSON")

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
    _add_allow_skipped(verify)

    claim = sub.add_parser(
        "claim",
        help="show (or take) the owner of each destination's prefix; exit 1 if another host's",
    )
    _add_common(claim)
    claim.add_argument(
        "--destination",
        metavar="NAME",
        action="append",
        help="only this destination (repeatable; default: all)",
    )
    claim.add_argument(
        "--take-over",
        action="store_true",
        help="claim the prefix for this host even if another owns it (a reinstalled host "
        "whose state directory is gone); needs --destination. Refused when the bucket holds "
        "bytes that this host's files lack (the daemon would replace them) unless "
        "--discard-remote",
    )
    claim.add_argument(
        "--discard-remote",
        action="store_true",
        help="with --take-over: take the prefix even if the daemon will then replace objects "
        "that hold bytes this host's files lack",
    )

    runs = sub.add_parser(
        "runs", help="read evaluation runs from a directory, s3:// or gs:// (a host or a fleet)"
    )
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    uri_help = (
        "a host prefix (an EvalStore: a directory, s3://bucket/prefix, gs://bucket/prefix) "
        "or a fleet prefix whose children are host prefixes"
    )
    runs_ls = runs_sub.add_parser("ls", help="list runs of every host, newest first")
    runs_show = runs_sub.add_parser(
        "show", help="one run (on whichever host holds it): metadata, results, trajectory counts"
    )
    runs_report = runs_sub.add_parser(
        "report", help="one self-contained HTML page: runs table and score-by-checkpoint plots"
    )
    runs_export = runs_sub.add_parser(
        "export", help="every sample of every run as one CSV table (DuckDB, Polars, pandas)"
    )
    restore = sub.add_parser(
        "restore", help="copy one run from a bucket into a local root, byte for byte"
    )
    for p in (runs_ls, runs_show, runs_report, runs_export, restore):
        p.add_argument(
            "--config",
            metavar="PATH",
            help="TOML configuration; URI may then be a destination name (its client settings apply)",
        )
        _add_allow_skipped(p)
    runs_ls.add_argument("uris", metavar="URI", nargs="+", help=uri_help)
    runs_ls.add_argument("--json", action="store_true", help="print one JSON array")
    runs_show.add_argument("uri", metavar="URI", help=uri_help)
    runs_show.add_argument("run_id", metavar="RUN_ID")
    runs_show.add_argument("--json", action="store_true", help="print JSON")
    runs_show.add_argument(
        "--trajectories",
        type=int,
        default=0,
        metavar="N",
        help="also print the first N of each benchmark",
    )
    runs_report.add_argument("uris", metavar="URI", nargs="+", help=uri_help)
    runs_report.add_argument(
        "-o", "--output", metavar="FILE", required=True, type=Path, help="the HTML file to write"
    )
    runs_report.add_argument("--title", default="Evaluation runs", help="the page title")
    runs_export.add_argument("uri", metavar="URI", help=uri_help)
    runs_export.add_argument(
        "-o", "--output", metavar="DIR", required=True, type=Path, help="writes DIR/samples.csv"
    )
    restore.add_argument("uri", metavar="URI", help=uri_help)
    restore.add_argument("run_id", metavar="RUN_ID")
    restore.add_argument(
        "--root", metavar="DIR", required=True, type=Path, help="the local EvalStore root"
    )

    check = sub.add_parser(
        "check",
        help="probe a bucket's server for the features evalsyncd relies on (exit 1: unusable)",
    )
    check.add_argument("uri", metavar="URL", help="s3://bucket/prefix or gs://bucket/prefix")
    check.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration; URL may then be a destination name (its client settings apply)",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    _add_view_parser(sub)

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


@contextlib.contextmanager
def _gc_held_until_ready() -> Iterator[Callable[[], None]]:
    """The cyclic garbage collector off while the daemon starts, on again at ``READY=1``.

    Start-up allocates far more than it frees: the modules, the SDK's parsed service
    model, the settings, the first scan. Each collection of the oldest generation
    walks all of it (about 0.1 s of CPU each, two or three before the first tail
    object; ``docs/benchmarks.md`` section 3). The callable this yields, called at
    ``READY=1``, moves what start-up allocated into the permanent generation
    (``gc.freeze``: never scanned again; freed as usual once unreferenced) and turns
    the collector back on. It is on again at exit from the block in any case.
    """
    was_enabled = gc.isenabled()
    gc.disable()

    def ready() -> None:
        if was_enabled and not gc.isenabled():
            gc.freeze()
            gc.enable()

    try:
        yield ready
    finally:
        if was_enabled:
            gc.enable()


async def _run_daemon(
    settings: Settings, config_args: argparse.Namespace, on_ready: Callable[[], None] = lambda: None
) -> int:
    import signal

    from evalsyncd.sync.service import Service
    from evalsyncd.systemd import Notifier, watchdog_interval_s

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_event = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_event.set)
    notifier = Notifier()

    def notify(line: str) -> None:
        if line == "READY=1":
            on_ready()
        notifier(line)

    metrics_server = None
    on_upload = None
    if settings.metrics_address:
        from evalsyncd.metrics import Metrics, MetricsServer

        metrics = Metrics()
        on_upload = metrics.on_upload
    service = Service(
        settings,
        notify=notify,
        watchdog_interval_s=watchdog_interval_s(),
        on_upload=on_upload,
        adopt_root=config_args.adopt_root,
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


async def _sync_once(settings: Settings, timeout_s: float, *, adopt_root: bool = False) -> int:
    import structlog

    from evalsyncd.sync.service import Service

    log = structlog.get_logger("evalsyncd.cli")
    service = Service(settings, adopt_root=adopt_root)
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
        _echo(json.dumps(report.to_dict(), indent=2))
    else:
        _echo(format_status(report))
    failed = False
    if report.parked:
        # for monitoring: a parked destination waits for a person, not for time
        _echo(f"evalsyncd: parked: {', '.join(report.parked)}", file=sys.stderr)
        failed = True
    if report.root_replaced:
        # so does a root that is not the directory mirrored (mount it, or --adopt-root)
        _echo(f"evalsyncd: root replaced: {report.root}", file=sys.stderr)
        failed = True
    return EX_FAILURE if failed else EX_OK


async def _evict(settings: Settings, *, dry_run: bool, as_json: bool) -> int:
    """``evalsyncd evict``: one retention round with the destinations' recorded states."""
    from contextlib import AsyncExitStack
    from dataclasses import asdict

    from evalsyncd.config import ensure_state_dir
    from evalsyncd.status import format_bytes
    from evalsyncd.sync.journal import Journal
    from evalsyncd.sync.retention import Mirror, Retention
    from evalsyncd.sync.service import JOURNAL_NAME, open_destination_storage

    journal = Journal(ensure_state_dir(settings) / JOURNAL_NAME, settings.root)
    async with AsyncExitStack() as stack:
        stack.callback(journal.close)
        records = journal.destinations()
        mirrors = []
        for dest in settings.destinations:
            storage = open_destination_storage(dest)
            await stack.enter_async_context(storage)
            storage.read_tail = False  # the plain objects
            state = records[dest.name].state if dest.name in records else "never run"
            mirrors.append(Mirror(dest.name, storage, state))
        report = await Retention(settings.root, settings.retention, journal, lambda: mirrors).round(
            dry_run=dry_run
        )
    if as_json:
        _echo(json.dumps(asdict(report), indent=2, default=str))
        return EX_OK
    verb = "would evict" if dry_run else "evicted"
    for r in report.runs:
        if r.evicted or (dry_run and r.choice and r.blocker is None):
            _echo(f"{verb} {r.run_id}: {format_bytes(r.bytes)} ({r.choice})")
        elif r.choice or r.blocker:
            _echo(f"kept {r.run_id}: {format_bytes(r.bytes)}: {r.blocker}")
    if report.stopped:
        _echo(f"nothing evicted: {report.stopped}")
    return EX_OK


async def _verify(
    settings: Settings, names: list[str] | None, as_json: bool, allow_skipped: bool = False
) -> int:
    from evalsyncd.sync.offline import open_destination_storage
    from evalsyncd.verify import verify_storage

    known = {d.name: d for d in settings.destinations}
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        _echo(
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
                _echo(json.dumps({"destination": name, **check.__dict__}), flush=True)
            else:
                size = "-" if check.remote_size is None else check.remote_size
                view = " (plain object)" if check.view == "plain" else ""
                _echo(
                    f"MISMATCH {name} {check.path}{view}: {check.problem}: {check.detail} "
                    f"(local {check.local_size} B, remote {size} B)",
                    flush=True,
                )

        storage = open_destination_storage(dest)
        plain = open_destination_storage(dest)  # the plain objects, as other tools read them
        plain.read_tail = False
        try:
            async with storage, plain:
                report = await verify_storage(
                    storage,
                    settings.root,
                    name=name,
                    exclude=(settings.state_dir,),
                    max_concurrency=dest.max_concurrency,
                    on_check=show,
                    plain=plain,
                    journal_rows=_journal_rows(settings, name),
                    max_main_lag_s=dest.max_main_lag_s,
                )
        except StorageError as exc:
            _echo(f"evalsyncd: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed = True
            continue
        for warning in report.warnings:
            _echo(f"warning {name} {warning}", file=sys.stderr)
        for skipped in report.skipped:
            _echo(f"skipped {name} {skipped}", file=sys.stderr)
        failed = failed or (bool(report.skipped) and not allow_skipped)
        for note in report.notes:
            _echo(f"info {name} {note.path} (plain object): {note.note}", file=sys.stderr)
        methods = ", ".join(f"{n} by {m}" for m, n in sorted(report.methods.items()))
        verdict = "OK" if report.ok else f"{len(report.mismatches)} MISMATCHES"
        if report.notes:
            verdict += (
                f" ({len(report.notes)} plain objects not yet up to date, within their due time)"
            )
        _echo(
            f"{name} ({report.url}): {report.checked} files checked ({methods or 'none'}): {verdict}",
            file=sys.stderr if as_json else sys.stdout,
        )
        failed = failed or not report.ok
    return EX_FAILURE if failed else EX_OK


def _add_allow_skipped(parser: argparse.ArgumentParser) -> None:
    """``--allow-skipped``: exit 0 although keys were refused or a tail log was damaged."""
    parser.add_argument(
        "--allow-skipped",
        action="store_true",
        help="exit 0 even when keys were skipped (refused names, oversized or unparseable "
        "files, a damaged tail log read around); they are still reported on stderr",
    )


def _report_skipped(what: list[str], allow: bool) -> bool:
    """Print ``evalsyncd: warning: skipped ...`` lines; whether they make the exit status 1."""
    for line in what:
        _echo(f"evalsyncd: warning: {line}", file=sys.stderr)
    return bool(what) and not allow


async def _claim(
    settings: Settings, names: list[str] | None, take: bool, discard: bool = False
) -> int:
    """``evalsyncd claim``: each destination's owner; with ``take``, this host's from now on
    (unless the bucket holds bytes this host's files lack and not ``discard``)."""
    from evalsyncd.config import ensure_state_dir
    from evalsyncd.errors import PrefixOwnedError
    from evalsyncd.sync.journal import Journal
    from evalsyncd.sync.offline import JOURNAL_NAME, open_destination_storage
    from evalsyncd.sync.owner import check_claim, record_owner, take_over

    known = {d.name: d for d in settings.destinations}
    unknown = [n for n in names or [] if n not in known]
    if unknown or (take and not names):
        what = f"unknown destination {', '.join(unknown)}" if unknown else "--take-over needs"
        _echo(
            f"evalsyncd: {what} --destination NAME; configured: {', '.join(known)}", file=sys.stderr
        )
        return EX_USAGE
    state_dir = ensure_state_dir(settings)
    with Journal(state_dir / JOURNAL_NAME, settings.root) as journal:
        writer = journal.writer_id()
    failed = False
    for name in names or list(known):
        storage = open_destination_storage(known[name])
        try:
            async with storage:
                if take:
                    lost = [] if discard else await _would_replace(settings, storage, name)
                    if lost:
                        _print_would_replace(name, storage.url(), lost, settings.root)
                        failed = True
                        continue
                    previous, claim = await take_over(storage, writer)
                    was = (
                        f"host {previous.host!r} (writer {previous.writer}, since {previous.when()})"
                        if previous is not None
                        else "nobody"
                    )
                    _echo(f"{name} ({storage.url()}): taken over from {was}: now this host's")
                else:
                    claim = await check_claim(storage, writer, name)
                    _echo(
                        f"{name} ({storage.url()}): owned by this host ({claim.host!r}, "
                        f"writer {writer}) since {claim.when()}"
                    )
                record_owner(state_dir, name, known[name].url, claim, True)
        except PrefixOwnedError as exc:
            _echo(f"{name}: {exc}")
            failed = True
        except StorageError as exc:
            _echo(f"evalsyncd: {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed = True
    return EX_FAILURE if failed else EX_OK


async def _would_replace(settings: Settings, storage: Backend, name: str) -> list[FileCheck]:
    """The checks of local files whose object (as readers see it) holds bytes the file
    lacks: a daemon taking the prefix over would replace them."""
    from evalsyncd.verify import verify_storage

    report = await verify_storage(storage, settings.root, name=name, exclude=(settings.state_dir,))
    return [c for c in report.mismatches if c.problem in ("size", "content")]


def _print_would_replace(name: str, url: str, lost: list[FileCheck], root: Path) -> None:
    _echo(
        f"{name} ({url}): not taken over: the bucket holds bytes that these files of "
        f"{root} lack, and this host's daemon would replace them:"
    )
    for check in lost[:20]:
        _echo(
            f"  {check.path}: {check.detail} (bucket {check.remote_size} B, local {check.local_size} B)"
        )
    if len(lost) > 20:
        _echo(f"  ... and {len(lost) - 20} more")
    _echo(
        "Fix: bring the bucket's copies back first (`evalsyncd restore URL ROOT RUN_ID` for a "
        "run, or copy the object down over the local file) before this host's writers go on, "
        "then take over; or pass --discard-remote to replace them."
    )


def _journal_rows(settings: Settings, destination: str) -> dict[str, Any] | None:
    """The destination's journal rows by path (read-only), or ``None`` without a journal."""
    from evalsyncd.sync.journal import Journal
    from evalsyncd.sync.offline import JOURNAL_NAME

    path = settings.state_dir / JOURNAL_NAME
    if not path.exists():
        return None
    with Journal(path, settings.root, readonly=True) as journal:
        return dict(journal.entries(destination))


def _echo(text: object, *, file: TextIO | None = None, flush: bool = False) -> None:
    """``print(text)``, control characters escaped (:func:`~evalsyncd.terminal.printable`):
    every line of text the CLI prints goes through here (names and errors from buckets)."""
    print(printable(str(text)), file=sys.stdout if file is None else file, flush=flush)


def _reader_logging() -> None:
    """stderr lines ``evalsyncd: warning: ...`` for the store's warnings (runs, restore).
    A damaged tail log is not among them: these commands name it once, with the host
    (the fleet's problems, :func:`_damaged_on_read`)."""
    import logging

    class _Lower(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return printable(f"evalsyncd: {record.levelname.lower()}: {record.getMessage()}")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lower())
    handler.addFilter(lambda record: not hasattr(record, "tail_damage"))
    log = logging.getLogger("evalsyncd")
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING)
    log.propagate = False


def _open_reader(uri: str, config: str | None) -> tuple[Storage, str]:
    """The storage a ``runs``/``restore`` URI names, and the prefix to read in it (no I/O).

    A cloud URI with a key prefix opens its parent and reads the last segment as
    the prefix: S3Storage reserves ``.evalsyncd/`` at its own root, and one level
    up the run catalog of a host prefix is a plain key. Local paths are not created.

    Raises:
        ConfigError: the configuration file is invalid.
        FileNotFoundError: a local path that is not a directory.
        ValueError: an unsupported URI.
    """
    if config:
        from evalsyncd.config import load_settings
        from evalsyncd.sync.offline import open_destination_storage

        for dest in load_settings(config).destinations:
            if uri == dest.name:
                return open_destination_storage(dest), ""
    from evalsyncd.storage.urls import SCHEMES, parse_url

    parsed = parse_url(uri)
    if not SCHEMES[parsed.scheme].cloud:
        if not Path(parsed.path).expanduser().is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        return parsed.open(mkdir=False), ""
    parent, _, leaf = parsed.path.rstrip("/").rpartition("/")
    if leaf:
        return replace(parsed, path=parent).open(), leaf
    return parsed.open(), ""


def _config_error(exc: ConfigError) -> int:
    """Report a configuration error on stderr; returns EX_CONFIG."""
    _echo(f"evalsyncd: configuration error:\n{exc}", file=sys.stderr)
    return EX_CONFIG


def _fail(exc: BaseException, where: str = "") -> None:
    prefix = f"{where}: " if where and where not in str(exc) else ""
    _echo(f"evalsyncd: error: {prefix}{type(exc).__name__}: {exc}", file=sys.stderr)


def _list_fleets(
    uris: list[str], config: str | None, allow_skipped: bool = False
) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Rows of every URI (a host or a fleet), problem lines, and whether all were read
    (and, unless ``allow_skipped``, nothing was skipped)."""
    from evalsyncd.fleet import Fleet

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    ok = True
    for uri in uris:
        try:
            storage, prefix = _open_reader(uri, config)
            with storage:
                listing = Fleet(storage, prefix).list_runs()
        except (StorageError, OSError, ValueError) as exc:
            _fail(exc, uri)
            problems.append(f"{uri}: {type(exc).__name__}: {exc}")
            ok = False
            continue
        for p in listing.problems:
            level = "error" if p.kind == "unreadable" else "warning"
            _echo(f"evalsyncd: {level}: {p.message}", file=sys.stderr)
            problems.append(p.message)
        ok = ok and listing.ok and (allow_skipped or not listing.skipped)
        rows.extend(r.to_dict() for r in listing.runs)
    return rows, problems, ok


def _runs(args: argparse.Namespace) -> int:
    from evalsyncd.runs import format_run, format_runs, run_details

    _reader_logging()
    try:
        if args.runs_command == "ls":
            rows, _, ok = _list_fleets(args.uris, args.config, args.allow_skipped)
            _echo(json.dumps(rows, indent=2) if args.json else format_runs(rows))
            return EX_OK if ok else EX_FAILURE
        if args.runs_command == "report":
            from evalsyncd.report import render_report

            rows, problems, ok = _list_fleets(args.uris, args.config, args.allow_skipped)
            page = render_report(rows, title=args.title, sources=args.uris, problems=problems)
            args.output.write_text(page, encoding="utf-8")
            _echo(f"wrote {args.output} ({len(rows)} runs)", file=sys.stderr)
            return EX_OK if ok else EX_FAILURE
        if args.runs_command == "export":
            return _export(args)
        with _run_store(args.uri, args.config, args.run_id) as found:
            if found is None:
                return EX_FAILURE
            host, store, damaged = found
            details = run_details(store, args.run_id, trajectories=args.trajectories)
            details = {"host": host, **details}
            _echo(json.dumps(details, indent=2) if args.json else format_run(details))
            damaged = _damaged_on_read(store, damaged)
            if damaged and not args.allow_skipped:
                return EX_FAILURE
    except ConfigError as exc:
        return _config_error(exc)
    except (StorageError, OSError, ValueError) as exc:
        _fail(exc)
        return EX_FAILURE
    return EX_OK


def _export(args: argparse.Namespace) -> int:
    """``runs export``: the samples table of a store or a fleet (evalsyncd.samples.export)."""
    from evalsyncd.samples.export import aexport_samples
    from evalsyncd.storage._bridge import run_sync

    storage, prefix = _open_reader(args.uri, args.config)
    with storage:
        summary = run_sync(aexport_samples(storage, prefix, args.output))
    for problem in summary.problems:
        level = "warning" if problem.startswith("bad line: ") else "error"
        _echo(f"evalsyncd: {level}: {problem}", file=sys.stderr)
    for message in summary.read_around:
        _echo(f"evalsyncd: warning: {message}", file=sys.stderr)
    _echo(
        f"wrote {summary.path} ({summary.rows} samples from {summary.files} files, "
        f"{summary.bad_lines} bad lines skipped)",
        file=sys.stderr,
    )
    if not summary.ok or (summary.read_around and not args.allow_skipped):
        return EX_FAILURE
    return EX_OK


@contextlib.contextmanager
def _run_store(
    uri: str, config: str | None, run_id: str
) -> Iterator[tuple[str, EvalStore, bool] | None]:
    """The host holding ``run_id`` under ``uri``, its store (open for the ``with`` block)
    and whether its tail log is damaged (read from the plain objects; reported);
    ``None`` (after a message) when no single host holds it.

    Raises:
        ConfigError, FileNotFoundError, ValueError: see :func:`_open_reader`.
    """
    storage, prefix = _open_reader(uri, config)
    with storage, contextlib.ExitStack() as stack:
        found = _find_one(storage, prefix, run_id, uri)
        if found is None:
            yield None
            return
        store = found[0].store(found[1])
        marker = store.eviction_marker(run_id)
        if marker is not None:  # evicted by retention: read the rest from the mirror
            store.fallback = stack.enter_context(_mirror_of(config, marker.mirrors))
        yield found[1], store, found[2]


def _mirror_of(config: str | None, mirrors: Sequence[str]) -> Storage:
    """The mirror of an evicted run: the first destination of ``config`` (with its client
    settings), else the first URL its eviction marker names (default client settings).

    Raises:
        ValueError: no config and a marker that names no mirror.
    """
    from evalsyncd.storage.urls import parse_url

    if config:
        from evalsyncd.config import load_settings
        from evalsyncd.sync.service import open_destination_storage

        return open_destination_storage(load_settings(config).destinations[0])
    if not mirrors:
        raise ValueError("the run was evicted and its marker names no mirror: pass --config")
    return parse_url(mirrors[0]).open()


def _find_one(storage: Storage, prefix: str, run_id: str, uri: str) -> tuple[Any, str, bool] | None:
    """The fleet, the one host holding ``run_id`` and whether that host's tail log is
    damaged; ``None`` (after a message) otherwise."""
    from evalsyncd.fleet import Fleet

    fleet = Fleet(storage, prefix)
    found, all_problems = fleet.find_run(run_id)
    problems = [p for p in all_problems if p.kind == "unreadable"]
    for p in all_problems:
        level = "error" if p.kind == "unreadable" else "warning"
        _echo(f"evalsyncd: {level}: {p.message}", file=sys.stderr)
    if len(found) > 1:
        _echo(
            f"evalsyncd: error: run {run_id} is on {len(found)} hosts of {uri}: "
            f"{', '.join(r.host for r in found)}; give one host prefix "
            f"(e.g. {fleet.store(found[0].host).url()})",
            file=sys.stderr,
        )
        return None
    if not found:
        where = "the hosts that could be read" if problems else f"any host of {uri}"
        _echo(f"evalsyncd: error: run {run_id} not found on {where}", file=sys.stderr)
        return None
    if problems:
        _echo(
            f"evalsyncd: warning: run {run_id} found on host {found[0].host!r}, "
            "but other hosts could not be checked for the same id",
            file=sys.stderr,
        )
    host = found[0].host
    return fleet, host, any(p.kind == "damaged" and p.host == host for p in all_problems)


def _damaged_on_read(store: EvalStore, reported: bool) -> bool:
    """Whether ``store``'s host is damaged: ``reported`` when listing it, or a damaged
    object its reads found since (a main object changed under pending tail pieces,
    read as its plain object), then named in a warning."""
    from evalsyncd.storage._bridge import run_sync
    from evalsyncd.storage.tail import tail_damage

    if reported:
        return True
    exc = run_sync(tail_damage(store.storage))
    if exc is None:
        return False
    _echo(
        f"evalsyncd: warning: {store.url()}: read from the plain objects (they may lack the "
        f"newest lines or hold bytes evalsyncd did not write): {exc}",
        file=sys.stderr,
    )
    return True


def _restore(args: argparse.Namespace) -> int:
    from evalsyncd.restore import RestoreConflictError, restore_run

    _reader_logging()
    try:
        with _run_store(args.uri, args.config, args.run_id) as found:
            if found is None:
                return EX_FAILURE
            result = restore_run(found[1], args.run_id, args.root)
            damaged = _damaged_on_read(found[1], found[2])
    except ConfigError as exc:
        return _config_error(exc)
    except RestoreConflictError as exc:
        _echo(f"evalsyncd: error: {exc}", file=sys.stderr)
        return EX_FAILURE
    except (StorageError, OSError, ValueError) as exc:
        _fail(exc)
        return EX_FAILURE
    if result.already_present:
        verb = "already present and identical"
    else:
        verb = f"restored {len(result.files)} files ({result.bytes} bytes)"
    index = "; runs.jsonl line appended" if result.index_appended else ""
    _echo(f"{args.run_id}: {verb} in {result.run_dir}{index}")
    skipped = [f"skipped {s}" for s in result.skipped]
    if skipped:
        _echo(f"{args.run_id}: {len(skipped)} keys skipped, not restored", file=sys.stderr)
    if _report_skipped(skipped, args.allow_skipped) or (damaged and not args.allow_skipped):
        return EX_FAILURE
    return EX_OK


def _check(args: argparse.Namespace) -> int:
    """``evalsyncd check URL``: probe the server (see :mod:`evalsyncd.storage.probe`).

    Exit 0 when the server is usable (missing features are printed with the
    fallback evalsyncd takes), 1 when it is not or the probe failed, 78 on a
    configuration error.
    """
    from evalsyncd.storage import GCSStorage, S3Storage
    from evalsyncd.storage.probe import probe

    _reader_logging()
    try:
        storage = _open_check_target(args.uri, args.config)
    except ConfigError as exc:
        return _config_error(exc)
    except (ValueError, StorageError) as exc:
        _fail(exc, args.uri)
        return 1
    if not isinstance(storage, S3Storage | GCSStorage):
        _fail(ValueError("only s3:// and gs:// URLs have a server to probe"), args.uri)
        return 1
    try:
        with storage:
            report = probe(storage)
    except StorageError as exc:
        _fail(exc, args.uri)
        return 1
    if args.json:
        _echo(json.dumps(report.to_dict(), indent=2))
    else:
        _echo(f"{report.url}:")
        width = max(len(r.feature) for r in report.results)
        for r in report.results:
            mark = "ok" if r.ok else "MISSING"
            line = f"  {r.feature:<{width}}  {mark:<7}  {r.answer}"
            _echo(line + (f"\n  {'':<{width}}           -> {r.consequence}" if not r.ok else ""))
        _echo("usable" if report.usable else "NOT usable")
    return EX_OK if report.usable else 1


def _open_check_target(uri: str, config: str | None) -> Storage:
    """The storage ``check`` probes: a destination of ``config`` by name, or a URL."""
    if config:
        from evalsyncd.config import load_settings
        from evalsyncd.sync.service import open_destination_storage

        for dest in load_settings(config).destinations:
            if uri == dest.name:
                return open_destination_storage(dest)
    from evalsyncd.storage.urls import parse_url

    return parse_url(uri).open()


def _add_view_parser(sub: Any) -> None:
    view = sub.add_parser(
        "view", help="a read-only local web app over runs, samples and comparisons (until Ctrl-C)"
    )
    view.add_argument(
        "uri",
        metavar="URI",
        help="a local root, a host prefix or a fleet prefix (a directory, s3://..., gs://...)",
    )
    view.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration; URI may then be a destination name (its client settings apply)",
    )
    view.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    view.add_argument(
        "--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port)"
    )
    view.add_argument(
        "--refresh",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often open pages look for new runs and samples (default 1)",
    )
    view.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name requests may use in their Host header (repeatable)",
    )


def _view(args: argparse.Namespace) -> int:
    """``evalsyncd view``: serve until SIGINT/SIGTERM; 0 on a clean stop."""
    import signal

    from evalsyncd.view import serve

    _reader_logging()
    if not args.refresh > 0:
        _echo("evalsyncd: error: --refresh must be > 0", file=sys.stderr)
        return EX_USAGE
    try:
        storage, prefix = _open_reader(args.uri, args.config)
    except ConfigError as exc:
        return _config_error(exc)
    except (StorageError, OSError, ValueError) as exc:
        _fail(exc, args.uri)
        return EX_FAILURE

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(url: str) -> None:
            _echo(f"evalsyncd view of {args.uri}: {url}  (Ctrl-C to stop)", flush=True)

        await serve(
            storage,
            prefix,
            host=args.host,
            port=args.port,
            refresh_s=args.refresh,
            allow_hosts=tuple(args.allow_host),
            stop=stop,
            on_ready=ready,
        )

    try:
        with storage:
            asyncio.run(run())
    except OSError as exc:
        _fail(exc, f"{args.host}:{args.port}")
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
    if args.command == "restore":
        return _restore(args)
    if args.command == "check":
        return _check(args)
    if args.command == "view":
        return _view(args)
    if args.command == "run":
        with _gc_held_until_ready() as ready:
            return _main_settings(args, ready)
    return _main_settings(args)


def _main_settings(args: argparse.Namespace, ready: Callable[[], None] = lambda: None) -> int:
    """The commands that read the settings (``run``, ``sync``, ``status``, ...); see :func:`main`."""
    from evalsyncd.logs import configure_logging
    from evalsyncd.sync.journal import JournalError

    try:
        settings = _settings(args)
    except ConfigError as exc:
        return _config_error(exc)
    quiet = args.command in ("status", "verify", "claim") or getattr(args, "dry_run", False)
    configure_logging(settings.log_format, "warning" if quiet else settings.log_level)
    try:
        if args.command == "run":
            return asyncio.run(_run_daemon(settings, args, ready))
        if args.command == "sync":
            return asyncio.run(_sync_once(settings, args.timeout, adopt_root=args.adopt_root))
        if args.command == "status":
            return _status(settings, args.json)
        if args.command == "verify":
            return asyncio.run(_verify(settings, args.destination, args.json, args.allow_skipped))
        if args.command == "claim":
            return asyncio.run(
                _claim(settings, args.destination, args.take_over, args.discard_remote)
            )
        if args.command == "evict":
            return asyncio.run(_evict(settings, dry_run=args.dry_run, as_json=args.json))
    except ConfigError as exc:  # the state directory cannot be created
        return _config_error(exc)
    except JournalError as exc:
        _echo(f"evalsyncd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def entrypoint() -> None:
    """Console-script entry point (and ``python -m evalsyncd``): the process is ours, so
    its aiohttp loads CA certificates only if a request may need them (:mod:`._cas`);
    :func:`main` called from another program leaves that program's aiohttp as it is."""
    from evalsyncd.storage._cas import defer_default_cas

    defer_default_cas()
    sys.exit(main())
