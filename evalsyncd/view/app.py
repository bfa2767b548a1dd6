"""The ``aiohttp.web`` application of ``evalsyncd view``: routes, security, errors.

Every page is server-rendered HTML (Jinja2, autoescaped) with a JSON twin: the
same URL with ``format=json``. Pages that change while open (the runs list, a
run, a samples page) name a *live fragment* (``fragment=1``): the piece of HTML
that ``static/view.js`` fetches every ``refresh_s`` seconds and swaps in.

Routes (all ``GET``; parameters in the query string, quoted with
:func:`urllib.parse.urlencode`):

==================  ==================================================================
``/``               runs of every host: ``q``, ``model``, ``host``, ``benchmark``,
                    ``sort`` (``created``, ``host``, ``model``, ``checkpoint``,
                    ``run``, ``status``, ``score:BENCHMARK``), ``order``, ``page``
``/checkpoints``    score by checkpoint, per benchmark (``benchmark`` to pick one)
``/run``            one run: ``host``, ``run``
``/samples``        a run's samples: ``host``, ``run``, ``benchmark``, ``page``,
                    ``size``, ``filter``, ``q``, ``regex``
``/sample``         one sample: ``host``, ``run``, ``benchmark``, ``line``
``/sample/text``    JSON: more of one long field of a sample (the "load more" button)
``/compare``        two runs of one benchmark: ``benchmark``, ``a_host``, ``a``,
                    ``b_host``, ``b`` (or ``b=HOST/RUN``), ``category``, ``page``
``/compare/pair``   one sample of A and of B side by side, with a diff of the answers
``/static/...``     the CSS and JS shipped in the package
==================  ==================================================================

Security (a local app that reads private results):

- requests whose ``Host`` is not the address the server listens on (or
  ``localhost``/``127.0.0.1``/``[::1]`` on its port, or a name given with
  ``--allow-host``) are refused with 403: a DNS-rebinding page cannot read it;
  so are requests with an ``Origin`` other than the server's own;
- every response carries ``Content-Security-Policy`` (``default-src 'none'``,
  scripts and styles only from the server itself, no inline script),
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
  ``Referrer-Policy: no-referrer``;
- every string read from a bucket is escaped by the templates; model text is
  shown as text (``<pre>``, ``textContent``), never interpreted as HTML;
- a failed read is a message in the page (with the status code that fits),
  never a crash: the server keeps serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from markupsafe import Markup, escape

from evalsyncd.errors import SampleError, SampleNotFoundError, StorageError
from evalsyncd.fleet import FleetRun
from evalsyncd.report import checkpoint_sort_key, score_figures
from evalsyncd.view import samples_pages
from evalsyncd.view.pages import (
    ENV,
    REFRESH_MS,
    SOURCE,
    PageError,
    environment,
    fragment,
    html,
    int_param,
    json_response,
    page_url,
    param,
    wants_json,
)
from evalsyncd.view.source import RunsSnapshot, ViewSource, metadata_row, run_status, score_of

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "FIRST_SCREEN_WAIT_S",
    "RUNS_PAGE_SIZE",
    "SOURCE",
    "PageError",
    "create_app",
    "page_url",
]

logger = logging.getLogger("evalsyncd.view")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
"""The Content-Security-Policy of every response: no inline script, nothing from the network."""

RUNS_PAGE_SIZE = 200
"""Rows of the runs table per page."""

FIRST_SCREEN_WAIT_S = 0.25
"""How long the runs page waits for the first listing of a fleet before it shows the
hosts listed so far (the rest follow through the live fragment), seconds."""

_ALLOWED = web.AppKey("allowed_names", frozenset)
_ROWS = web.AppKey("rows_cache", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- rendering --------------------------------------------------------------------------


def _fmt_score(value: object) -> str:
    s = score_of(value)
    return "-" if s is None else f"{s:.3f}"


# -- security ---------------------------------------------------------------------------


def _allowed_names(bind_host: str, allow_hosts: tuple[str, ...]) -> frozenset[str]:
    names = {bind_host.lower(), "localhost", "127.0.0.1", "[::1]"}
    if ":" in bind_host and not bind_host.startswith("["):
        names.add(f"[{bind_host.lower()}]")
    names.update(h.lower() for h in allow_hosts)
    return frozenset(names)


def _local_port(request: web.Request) -> int | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return None


def _host_ok(request: web.Request, value: str) -> bool:
    names = request.app[_ALLOWED]
    value = value.strip().lower()
    name, sep, port = value.rpartition(":")
    if not sep:
        return False
    if not port.isdigit() or int(port) != _local_port(request):
        return False
    return name in names


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign ``Host``/``Origin`` (DNS rebinding, cross-site reads); turn errors into pages."""
    host = request.headers.get("Host", "")
    if not _host_ok(request, host):
        return _refuse(request, f"refused: Host {host!r} is not this server's address")
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.scheme != "http" or not _host_ok(request, parts.netloc):
            return _refuse(request, f"refused: Origin {origin!r} is not this server")
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except PageError as exc:
        return _error(request, exc.status, exc.message)
    except (FileNotFoundError, SampleNotFoundError) as exc:
        return _error(request, 404, f"not found: {exc}")
    except (StorageError, OSError) as exc:
        return _error(request, 502, f"could not read: {type(exc).__name__}: {exc}")
    except ValueError as exc:
        return _error(request, 400, f"bad request: {exc}")
    except SampleError as exc:  # e.g. the file changed while it was read
        return _error(request, 409, f"could not read the samples: {exc}")
    except Exception as exc:
        logger.exception("view: %s failed", request.path_qs)
        return _error(request, 500, f"internal error: {type(exc).__name__}: {exc}")


def _refuse(request: web.Request, message: str) -> web.Response:
    return web.Response(text=message + "\n", status=403, content_type="text/plain")


def _error(request: web.Request, status: int, message: str) -> web.Response:
    if wants_json(request):
        return json_response({"error": message, "status": status}, status)
    if fragment(request):
        body = f'<p class="problem" data-error="{status}">{_escape(message)}</p>'
        return web.Response(text=body, status=status, content_type="text/html")
    return html(request, "error.html", status=status, code=status, message=message)


def _escape(text: str) -> str:
    return str(escape(text))


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"


# -- runs -------------------------------------------------------------------------------


def _row(run: FleetRun) -> dict[str, Any]:
    """A run as the pages use it: every field a plain string or number (hostile types tamed)."""
    m = run.metadata
    scores_raw = m.scores if isinstance(m.scores, Mapping) else {}
    benchmarks_raw = m.benchmarks if isinstance(m.benchmarks, list) else []
    scores = {str(b): score_of(s) for b, s in scores_raw.items()}
    return {
        "host": run.host,
        "run_id": str(m.run_id),
        "model_name": str(m.model_name),
        "checkpoint_name": None if m.checkpoint_name is None else str(m.checkpoint_name),
        "timestamp": str(m.timestamp),
        "benchmarks": sorted({str(b) for b in benchmarks_raw} | set(scores)),
        "scores": {b: s for b, s in scores.items() if s is not None},
        "status": run_status(m),
    }


def _href(row: dict[str, Any]) -> str:
    """The run page's URL of a row (made for the rows shown, not for every run)."""
    return page_url("/run", host=row["host"], run=row["run_id"])


def _rows(request: web.Request, snap: RunsSnapshot) -> list[dict[str, Any]]:
    """The rows of a snapshot, made once per snapshot (every poll of every tab reuses them)."""
    cached = request.app[_ROWS]
    if cached.get("snap") is not snap:
        cached["snap"], cached["rows"] = snap, [_row(r) for r in snap.runs]
    rows: list[dict[str, Any]] = cached["rows"]
    return rows


_SORTS = ("created", "host", "model", "checkpoint", "run", "status")


def _sort_key(sort: str) -> Callable[[dict[str, Any]], Any]:
    if sort.startswith("score:"):
        bench = sort[len("score:") :]

        def by_score(r: dict[str, Any]) -> Any:
            s = r["scores"].get(bench)
            return (s is not None, s if s is not None else 0.0)

        return by_score
    keys: dict[str, Callable[[dict[str, Any]], Any]] = {
        "created": lambda r: (r["timestamp"], r["run_id"]),
        "host": lambda r: (r["host"], r["timestamp"]),
        "model": lambda r: (r["model_name"], checkpoint_sort_key(r["checkpoint_name"])),
        "checkpoint": lambda r: (checkpoint_sort_key(r["checkpoint_name"]), r["model_name"]),
        "run": lambda r: r["run_id"],
        "status": lambda r: (r["status"], r["timestamp"]),
    }
    if sort not in keys:
        raise PageError(400, f"unknown sort {sort!r} (one of {', '.join(_SORTS)}, score:BENCHMARK)")
    return keys[sort]


def _filtered_runs(request: web.Request, snap: RunsSnapshot) -> dict[str, Any]:
    q = request.query.get("q", "").strip()
    model = request.query.get("model", "")
    host = request.query.get("host")
    benchmark = request.query.get("benchmark", "")
    status = request.query.get("status", "")
    sort = request.query.get("sort", "created") or "created"
    order = request.query.get("order", "")
    if order not in ("", "asc", "desc"):
        raise PageError(400, f"order must be asc or desc, not {order!r}")
    descending = order == "desc" or (
        order == "" and (sort == "created" or sort.startswith("score:"))
    )
    all_rows = _rows(request, snap)
    rows = all_rows
    if q:
        needle = q.casefold()
        rows = [
            r
            for r in rows
            if any(
                needle in str(r[k] or "").casefold()
                for k in ("host", "run_id", "model_name", "checkpoint_name", "timestamp")
            )
            or any(needle in b.casefold() for b in r["benchmarks"])
        ]
    if model:
        rows = [r for r in rows if r["model_name"] == model]
    if host:
        rows = [r for r in rows if r["host"] == host]
    if benchmark:
        rows = [r for r in rows if benchmark in r["benchmarks"]]
    if status:
        rows = [r for r in rows if r["status"] == status]
    rows = sorted(rows, key=_sort_key(sort), reverse=descending)
    pages = max(1, math.ceil(len(rows) / RUNS_PAGE_SIZE))
    page = int_param(request, "page", 1, 1, 1_000_000)
    shown = [
        {**r, "href": _href(r)} for r in rows[(page - 1) * RUNS_PAGE_SIZE : page * RUNS_PAGE_SIZE]
    ]
    benchmarks = (
        [benchmark] if benchmark else sorted({b for r in all_rows for b in r["benchmarks"]})
    )
    params = {
        "q": q,
        "model": model,
        "host": host or "",
        "benchmark": benchmark,
        "status": status,
        "sort": "" if sort == "created" else sort,
        "order": order,
    }
    return {
        "rows": shown,
        "total": len(all_rows),
        "matched": len(rows),
        "page": page,
        "pages": pages,
        "benchmarks": benchmarks,
        "all_benchmarks": sorted({b for r in all_rows for b in r["benchmarks"]}),
        "models": sorted({r["model_name"] for r in all_rows}),
        "hosts": snap.hosts,
        "params": params,
        "sort": sort,
        "descending": descending,
    }


def _snapshot_info(snap: RunsSnapshot) -> dict[str, Any]:
    return {
        "complete": snap.complete,
        "hosts_listed": snap.hosts_listed,
        "error": snap.error,
        "problems": [p.message for p in snap.problems],
        "hosts": snap.hosts,
        "read_at": snap.read_at,
        "took_s": round(snap.took_s, 4),
    }


async def _runs_page(request: web.Request) -> web.StreamResponse:
    # The page itself may show the first hosts of a fleet's first listing at once; its
    # live fragment and its JSON twin wait for the whole listing.
    first_screen = not fragment(request) and not wants_json(request)
    snap = await request.app[SOURCE].runs(
        partial_after_s=FIRST_SCREEN_WAIT_S if first_screen else None
    )
    view = _filtered_runs(request, snap)
    if wants_json(request):
        return json_response(
            {
                **_snapshot_info(snap),
                "total": view["total"],
                "matched": view["matched"],
                "page": view["page"],
                "pages": view["pages"],
                "runs": [{k: v for k, v in r.items() if k != "href"} for r in view["rows"]],
            }
        )
    template = "runs_live.html" if fragment(request) else "runs.html"
    return html(request, template, snap=snap, info=_snapshot_info(snap), **view)


# -- score by checkpoint ----------------------------------------------------------------


async def _checkpoints_page(request: web.Request) -> web.StreamResponse:
    snap = await request.app[SOURCE].runs()
    rows = _rows(request, snap)
    only = request.query.get("benchmark", "")
    newest: dict[tuple[str, str | None], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["timestamp"], r["run_id"])):
        newest[(r["model_name"], r["checkpoint_name"])] = r  # the last one wins: the newest

    def href(model: str, checkpoint: str | None) -> str | None:
        r = newest.get((model, checkpoint))
        return None if r is None else _href(r)

    series: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        for b, s in r["scores"].items():
            series.setdefault(b, {}).setdefault(r["model_name"], []).append(
                {
                    "checkpoint": r["checkpoint_name"],
                    "score": s,
                    "host": r["host"],
                    "run_id": r["run_id"],
                }
            )
    for per_model in series.values():
        for points in per_model.values():
            points.sort(key=lambda p: (checkpoint_sort_key(p["checkpoint"]), p["run_id"]))
    if only:
        series = {b: v for b, v in series.items() if b == only}
    if wants_json(request):
        return json_response({**_snapshot_info(snap), "benchmarks": series})
    figures = [(b, fig) for b, fig in score_figures(rows, href=href) if not only or b == only]
    return html(
        request,
        "checkpoints.html",
        info=_snapshot_info(snap),
        figures=[(b, Markup(fig)) for b, fig in figures],
        benchmark=only,
        all_benchmarks=sorted(series) if not only else [only],
    )


# -- one run ----------------------------------------------------------------------------


async def _run_page(request: web.Request) -> web.StreamResponse:
    source = request.app[SOURCE]
    host = param(request, "host", required=False)
    run_id = param(request, "run")
    details = await source.run(host, run_id)
    row = _row(details.run)
    results = {b: (None if res is None else res.to_dict()) for b, res in details.results.items()}
    if wants_json(request):
        return json_response(
            {
                "run": {**metadata_row(details.run), "status": row["status"]},
                "url": details.run.url,
                "benchmarks": details.benchmarks,
                "results": results,
                "problems": details.problems,
            }
        )
    snap = await source.runs()
    others: dict[str, list[dict[str, Any]]] = {}
    for b in details.benchmarks:
        others[b] = [
            r
            for r in _rows(request, snap)
            if b in r["benchmarks"] and (r["host"], r["run_id"]) != (host, run_id)
        ]
    config = details.run.metadata.config
    template = "run_live.html" if fragment(request) else "run.html"
    return html(
        request,
        template,
        run=row,
        location=details.run.url,
        checkpoint_path=str(details.run.metadata.checkpoint_path or ""),
        config=config if isinstance(config, dict) else {"config": config},
        benchmarks=details.benchmarks,
        results=results,
        problems=details.problems,
        others=others,
    )


async def _no_content(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


# -- the application --------------------------------------------------------------------


def create_app(
    source: ViewSource,
    *,
    bind_host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
) -> web.Application:
    """The view's application over ``source`` (which the caller opened and closes).

    Args:
        source: what to read.
        bind_host: the address the server listens on; with ``localhost``,
            ``127.0.0.1`` and ``[::1]`` the names a request's ``Host`` may use.
        allow_hosts: more host names requests may use (e.g. the machine's name
            when listening on a public address).
    """
    app = web.Application(middlewares=[_guard])
    app[SOURCE] = source
    app[ENV] = environment({"score": _fmt_score})
    app[_ALLOWED] = _allowed_names(bind_host, allow_hosts)
    app[REFRESH_MS] = max(250, int(source.refresh_s * 1000))
    app[_ROWS] = {}
    app.on_response_prepare.append(_security_headers)
    static = resources.files("evalsyncd.view") / "static"
    app.router.add_get("/", _runs_page)
    app.router.add_get("/favicon.ico", _no_content)
    app.router.add_get("/checkpoints", _checkpoints_page)
    app.router.add_get("/run", _run_page)
    samples_pages.add_routes(app)
    app.router.add_static("/static/", str(static), follow_symlinks=False)
    return app
