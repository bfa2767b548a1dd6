"""What every page of ``evalsyncd view`` shares: the application keys, rendering,
parameters and the one error a handler raises.

:mod:`evalsyncd.view.app` (the runs, checkpoint and run pages, the security
middleware, the application) and :mod:`evalsyncd.view.samples_pages` (samples,
one sample, compare) both build on this module; neither imports the other's
handlers' helpers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from evalsyncd.view.source import ViewSource

__all__ = [
    "ENV",
    "REFRESH_MS",
    "SOURCE",
    "PageError",
    "environment",
    "fragment",
    "html",
    "int_param",
    "json_response",
    "page_url",
    "param",
    "wants_json",
]

SOURCE = web.AppKey("source", ViewSource)
"""The application key holding the :class:`ViewSource`."""
ENV = web.AppKey("jinja", jinja2.Environment)
"""The application key holding the Jinja2 environment (:func:`environment`)."""
REFRESH_MS = web.AppKey("refresh_ms", int)
"""The application key holding how often live pages refresh, milliseconds."""


class PageError(Exception):
    """A request that cannot be answered, with its HTTP status and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def page_url(path: str, **params: object) -> str:
    """``path?k=v&...`` with every value quoted; ``None`` and ``""`` values are left out."""
    query = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    return f"{path}?{urlencode(query)}" if query else path


def environment(filters: dict[str, Callable[[Any], str]]) -> jinja2.Environment:
    """The templates' environment: autoescaping on for every template, ``url`` =
    :func:`page_url`, undefined names are errors; ``filters`` added."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("evalsyncd.view", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["url"] = page_url
    env.filters.update(filters)
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, default=str, sort_keys=True)
    return env


def html(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """``template`` rendered with ``context`` (plus the source's URL and the refresh period)."""
    env = request.app[ENV]
    source = request.app[SOURCE]
    text = env.get_template(template).render(
        source_url=source.url(),
        refresh_ms=request.app[REFRESH_MS],
        request_path=request.path,
        **context,
    )
    # Strings from a bucket may hold lone surrogates (JSON "\udc80"): never fail on them.
    return web.Response(
        body=text.encode("utf-8", "replace"),
        status=status,
        content_type="text/html",
        charset="utf-8",
    )


def json_response(data: Any, status: int = 200) -> web.Response:
    """``data`` as JSON (ASCII, no NaN; unknown types as strings)."""
    text = json.dumps(data, default=str, allow_nan=False, ensure_ascii=True)
    return web.Response(text=text, status=status, content_type="application/json")


def wants_json(request: web.Request) -> bool:
    """The request asks for the page's JSON twin (``format=json``)."""
    return request.query.get("format") == "json"


def fragment(request: web.Request) -> bool:
    """The request asks for the page's live fragment (``fragment=1``)."""
    return request.query.get("fragment") == "1"


def param(request: web.Request, name: str, *, required: bool = True) -> str:
    """A query parameter (``""`` when absent and not required).

    Raises:
        PageError: 400, a required parameter is absent or empty.
    """
    value = request.query.get(name)
    if value is None or (required and value == ""):
        if required:
            raise PageError(400, f"missing parameter {name!r}")
        return ""
    return value


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in ``[lo, hi]`` (``default`` when absent or empty).

    Raises:
        PageError: 400, not an integer or out of range.
    """
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PageError(400, f"parameter {name!r} must be an integer, not {raw!r}") from None
    if not lo <= value <= hi:
        raise PageError(400, f"parameter {name!r} must be between {lo} and {hi}, not {value}")
    return value
