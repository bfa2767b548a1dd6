"""The samples, one-sample and compare pages, over :mod:`evalsyncd.samples`.

- ``/samples``: one run's benchmark, a page of at most :data:`MAX_PAGE_SIZE`
  rows from the per-file sample index (line, idx, example id, reward, correct,
  error), filtered (all, correct, incorrect, errors) or searched (text or
  regular expression over each sample's line); a live fragment picks up the
  samples a running eval appends.
- ``/sample``: one sample (one ranged read of its line): turns, reward,
  metrics, logs, error. Long texts are cut at :data:`TEXT_LIMIT` characters;
  ``/sample/text`` serves the rest in pieces of :data:`TEXT_CHUNK` ("load more").
- ``/compare``: two runs of one benchmark matched by ``example_id`` and ``idx``:
  categories, counts, exact McNemar p, paired bootstrap interval of the reward
  difference; ``/compare/pair`` shows one sample of each side by side with a
  diff of the final answers (:mod:`difflib`).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import math
from collections import OrderedDict
from dataclasses import asdict, is_dataclass
from typing import Any

from aiohttp import web

from evalsyncd.samples import (
    Category,
    Comparison,
    SampleEntry,
    SampleFilter,
    SampleIndex,
    SampleReader,
    compare_indexes,
)
from evalsyncd.store import StoredTrajectory
from evalsyncd.view.pages import (
    SOURCE,
    PageError,
    fragment,
    html,
    int_param,
    json_response,
    page_url,
    param,
    wants_json,
)

__all__ = [
    "COMPARE_PAGE_SIZE",
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "TEXT_CHUNK",
    "TEXT_LIMIT",
    "add_routes",
    "final_answer",
]

DEFAULT_PAGE_SIZE = 100
"""Sample rows per page unless ``size`` says otherwise."""
MAX_PAGE_SIZE = 500
"""The most sample rows a page holds: the browser never gets more."""
COMPARE_PAGE_SIZE = 200
"""Rows of a comparison per page."""
TEXT_LIMIT = 20_000
"""Characters of one text (a turn, the logs, the error) shown before "load more"."""
TEXT_CHUNK = 200_000
"""Characters each "load more" brings."""
_COMPARISONS_KEPT = 8

_READERS = web.AppKey("sample_readers", dict)
_COMPARISONS = web.AppKey("comparisons", OrderedDict)


# -- readers ----------------------------------------------------------------------------


def _reader(request: web.Request, host: str) -> SampleReader:
    readers: dict[str, SampleReader] = request.app[_READERS]
    found = readers.get(host)
    if found is None:
        source = request.app[SOURCE]
        found = SampleReader(source.host_storage(host), cache_dir=source.cache_dir)
        readers[host] = found
    return found


def _filter(request: web.Request) -> SampleFilter:
    raw = request.query.get("filter", "") or "all"
    try:
        return SampleFilter(raw)
    except ValueError:
        choices = ", ".join(f.value for f in SampleFilter)
        raise PageError(400, f"unknown filter {raw!r} (one of {choices})") from None


def _entry(e: SampleEntry) -> dict[str, Any]:
    return {
        "line": e.line,
        "start": e.start,
        "length": e.length,
        "idx": e.idx,
        "example_id": e.example_id,
        "reward": _num(e.reward),
        "correct": e.correct,
        "error": e.error,
    }


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _run_params(request: web.Request) -> tuple[str, str, str]:
    host = param(request, "host", required=False)
    run_id = param(request, "run")
    benchmark = param(request, "benchmark")
    request.app[SOURCE].check_host(host)
    return host, run_id, benchmark


# -- samples ----------------------------------------------------------------------------


async def _samples_page(request: web.Request) -> web.StreamResponse:
    host, run_id, benchmark = _run_params(request)
    which = _filter(request)
    size = int_param(request, "size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    number = int_param(request, "page", 1, 1, 10**9)
    pattern = request.query.get("q", "")
    regex = request.query.get("regex", "") == "1"
    offset = int_param(request, "offset", 0, 0, 2**62)
    reader = _reader(request, host)
    index: SampleIndex = await reader.aindex(run_id, benchmark)
    try:
        if not index.exists:
            # a run whose benchmark has not written a sample yet, or no such run at all
            await request.app[SOURCE].fleet.store(host).aread_run(run_id)
        counts = {f.value: index.count(f) for f in SampleFilter}
        next_offset: int | None = None
        if pattern:
            found = await reader.asearch(
                run_id, benchmark, pattern, regex=regex, filter=which, offset=offset, limit=size
            )
            entries = [e for e, _ in found.matches]
            next_offset = found.next_offset if found.more else None
            total = None
            pages = None
        else:
            total = counts[which.value]
            pages = max(1, math.ceil(total / size))
            entries = index.page(number - 1, size, which)
    finally:
        index.close()
    params = {
        "host": host,
        "run": run_id,
        "benchmark": benchmark,
        "filter": "" if which == SampleFilter.ALL else which.value,
        "q": pattern,
        "regex": "1" if regex else "",
        "size": "" if size == DEFAULT_PAGE_SIZE else size,
    }
    rows = [_entry(e) for e in entries]
    for r in rows:
        r["href"] = page_url("/sample", host=host, run=run_id, benchmark=benchmark, line=r["line"])
    if wants_json(request):
        return json_response(
            {
                "host": host,
                "run_id": run_id,
                "benchmark": benchmark,
                "filter": which.value,
                "counts": counts,
                "exists": index.exists,
                "complete": index.complete,
                "indexed_bytes": index.indexed_bytes,
                "page": None if pattern else number,
                "pages": pages,
                "size": size,
                "search": {"pattern": pattern, "regex": regex, "offset": offset}
                if pattern
                else None,
                "next_offset": next_offset,
                "samples": [{k: v for k, v in r.items() if k != "href"} for r in rows],
            }
        )
    template = "samples_live.html" if fragment(request) else "samples.html"
    return html(
        request,
        template,
        host=host,
        run_id=run_id,
        benchmark=benchmark,
        which=which.value,
        filters=[f.value for f in SampleFilter],
        counts=counts,
        complete=index.complete,
        exists=index.exists,
        location=reader.url(run_id, benchmark),
        rows=rows,
        page=number,
        pages=pages,
        total=total,
        size=size,
        pattern=pattern,
        regex=regex,
        offset=offset,
        next_offset=next_offset,
        params=params,
    )


# -- one sample -------------------------------------------------------------------------


def _texts(t: StoredTrajectory) -> dict[str, str]:
    """The sample's long texts by field name: ``turn:N``, ``logs``, ``error``, ``metrics``."""
    out = {f"turn:{i}": str(turn.content) for i, turn in enumerate(t.turns)}
    out["logs"] = _pretty(t.logs)
    out["metrics"] = _pretty(t.metrics)
    out["error"] = "" if t.error is None else str(t.error)
    return out


def _pretty(value: object) -> str:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.dumps(value, indent=2, default=str, sort_keys=True, ensure_ascii=False)


def final_answer(t: StoredTrajectory) -> str:
    """The content of the last assistant turn (``""`` when there is none)."""
    for turn in reversed(t.turns):
        if turn.role == "assistant":
            return str(turn.content)
    return ""


async def _read_sample(
    request: web.Request, host: str, run_id: str, benchmark: str, line: int
) -> StoredTrajectory:
    _, sample = await _reader(request, host).asample(run_id, benchmark, line)
    return sample


def _sample_view(t: StoredTrajectory, key: str, text_url: dict[str, Any]) -> dict[str, Any]:
    """What the sample templates need: each text cut at TEXT_LIMIT, with its "load more" URL."""
    texts = _texts(t)

    def cut(name: str) -> dict[str, Any]:
        full = texts[name]
        shown = full[:TEXT_LIMIT]
        more = None
        if len(full) > TEXT_LIMIT:
            more = page_url("/sample/text", **text_url, field=name, offset=TEXT_LIMIT)
        return {
            "id": f"{key}-{name.replace(':', '-')}",
            "text": shown,
            "total": len(full),
            "more": more,
        }

    return {
        "idx": t.idx,
        "example_id": str(t.example_id),
        "reward": _num(t.reward),
        "time_seconds": _num(t.time_seconds),
        "turns": [
            {"role": str(turn.role), "token_count": turn.token_count, **cut(f"turn:{i}")}
            for i, turn in enumerate(t.turns)
        ],
        "metrics": cut("metrics"),
        "logs": cut("logs"),
        "error": cut("error") if t.error is not None else None,
        "final_answer": final_answer(t),
    }


async def _sample_page(request: web.Request) -> web.StreamResponse:
    host, run_id, benchmark = _run_params(request)
    line = int_param(request, "line", -1, 0, 2**62)
    if line < 0:
        raise PageError(400, "missing parameter 'line'")
    t = await _read_sample(request, host, run_id, benchmark, line)
    text_url = {"host": host, "run": run_id, "benchmark": benchmark, "line": line}
    view = _sample_view(t, "s", text_url)
    if wants_json(request):
        data = t.to_dict()
        if request.query.get("full") != "1":
            for turn in data["turns"]:
                if isinstance(turn.get("content"), str) and len(turn["content"]) > TEXT_LIMIT:
                    turn["content_length"] = len(turn["content"])
                    turn["content"] = turn["content"][:TEXT_LIMIT]
                    turn["truncated"] = True
        return json_response({"host": host, "run_id": run_id, "line": line, "sample": data})
    return html(
        request,
        "sample.html",
        host=host,
        run_id=run_id,
        benchmark=benchmark,
        line=line,
        s=view,
        back=page_url("/samples", host=host, run=run_id, benchmark=benchmark),
    )


async def _sample_text(request: web.Request) -> web.StreamResponse:
    """JSON ``{"text": ..., "next": offset or null}``: more of one long text of a sample."""
    host, run_id, benchmark = _run_params(request)
    line = int_param(request, "line", -1, 0, 2**62)
    offset = int_param(request, "offset", 0, 0, 2**62)
    name = param(request, "field")
    if line < 0:
        raise PageError(400, "missing parameter 'line'")
    if (name.startswith("turn:") and name[5:].isdigit()) or name == "error":
        turn = None if name == "error" else int(name[5:])
        reader = _reader(request, host)
        text = await reader.atext(run_id, benchmark, line, turn, offset, TEXT_CHUNK)
    elif name in ("logs", "metrics"):
        t = await _read_sample(request, host, run_id, benchmark, line)
        text = _texts(t)[name][offset : offset + TEXT_CHUNK]
    else:
        raise PageError(400, f"unknown field {name!r} (turn:N, error, logs or metrics)")
    return json_response(
        {"text": text, "next": offset + len(text) if len(text) == TEXT_CHUNK else None}
    )


# -- compare ----------------------------------------------------------------------------


def _side(request: web.Request, which: str) -> tuple[str, str]:
    """``(host, run_id)`` of side ``a`` or ``b``: ``{which}_host`` + ``{which}``, or ``{which}=HOST/RUN``."""
    raw = param(request, which)
    host = request.query.get(f"{which}_host")
    if host is None and "/" in raw:
        host, raw = raw.split("/", 1)
    host = host or ""
    request.app[SOURCE].check_host(host)
    return host, raw


async def _comparison(
    request: web.Request, benchmark: str, a: tuple[str, str], b: tuple[str, str]
) -> tuple[Comparison, dict[str, int]]:
    idx_a, idx_b = await asyncio.gather(
        _reader(request, a[0]).aindex(a[1], benchmark),
        _reader(request, b[0]).aindex(b[1], benchmark),
    )
    try:
        for side, index in (("A", idx_a), ("B", idx_b)):
            if not index.exists:
                run = a if side == "A" else b
                raise PageError(
                    404,
                    f"{side}: run {run[1]} has no samples of {benchmark} ({index.url or 'missing'})",
                )
        sizes = {"a": idx_a.count(SampleFilter.ALL), "b": idx_b.count(SampleFilter.ALL)}
        key = (benchmark, a, b, idx_a.indexed_bytes, idx_b.indexed_bytes)
        cache: OrderedDict[Any, Comparison] = request.app[_COMPARISONS]
        found = cache.get(key)
        if found is None:
            found = await asyncio.to_thread(compare_indexes, idx_a, idx_b, seed=0)
            cache[key] = found
            while len(cache) > _COMPARISONS_KEPT:
                cache.popitem(last=False)
        return found, sizes
    finally:
        idx_a.close()
        idx_b.close()


def _category(value: object) -> str:
    return str(getattr(value, "value", value))


async def _compare_page(request: web.Request) -> web.StreamResponse:
    benchmark = param(request, "benchmark")
    a, b = _side(request, "a"), _side(request, "b")
    only = request.query.get("category", "")
    categories = [c.value for c in Category]
    if only and only not in categories:
        raise PageError(400, f"unknown category {only!r} (one of {', '.join(categories)})")
    number = int_param(request, "page", 1, 1, 10**9)
    result, sizes = await _comparison(request, benchmark, a, b)
    rows = result.rows.select(only or None)
    pages = max(1, math.ceil(len(rows) / COMPARE_PAGE_SIZE))
    shown = rows[(number - 1) * COMPARE_PAGE_SIZE : number * COMPARE_PAGE_SIZE]
    counts = {_category(k): int(v) for k, v in dict(result.counts).items()}
    ci = tuple(result.reward_diff_ci) if result.reward_diff_ci is not None else None
    base = {"benchmark": benchmark, "a_host": a[0], "a": a[1], "b_host": b[0], "b": b[1]}

    def row(r: Any) -> dict[str, Any]:
        ea, eb = r.entry_a, r.entry_b
        out = {
            "category": _category(r.category),
            "a": None if ea is None else _entry(ea),
            "b": None if eb is None else _entry(eb),
        }
        out["example_id"], out["idx"] = r.key
        out["href"] = page_url(
            "/compare/pair",
            **base,
            a_line=None if ea is None else ea.line,
            b_line=None if eb is None else eb.line,
        )
        return out

    table = [row(r) for r in shown]
    stats = {
        "counts": counts,
        "matched": result.matched,
        "reward_diff": _num(result.reward_diff),
        "mcnemar_p": _num(result.mcnemar_p),
        "reward_diff_ci": None if ci is None else [_num(ci[0]), _num(ci[1])],
        "samples": sizes,
    }
    if wants_json(request):
        return json_response(
            {
                **base,
                **stats,
                "category": only or None,
                "page": number,
                "pages": pages,
                "rows": [{k: v for k, v in r.items() if k != "href"} for r in table],
            }
        )
    return html(
        request,
        "compare.html",
        base=base,
        stats=stats,
        categories=categories,
        only=only,
        rows=table,
        page=number,
        pages=pages,
        matched=len(rows),
    )


async def _pair_page(request: web.Request) -> web.StreamResponse:
    benchmark = param(request, "benchmark")
    a, b = _side(request, "a"), _side(request, "b")
    lines = {}
    for side in ("a", "b"):
        raw = request.query.get(f"{side}_line", "")
        lines[side] = None if raw == "" else int_param(request, f"{side}_line", 0, 0, 2**62)
    if lines["a"] is None and lines["b"] is None:
        raise PageError(400, "missing parameter 'a_line' or 'b_line'")

    async def one(side: str, where: tuple[str, str]) -> dict[str, Any] | None:
        line = lines[side]
        if line is None:
            return None
        t = await _read_sample(request, where[0], where[1], benchmark, line)
        url = {"host": where[0], "run": where[1], "benchmark": benchmark, "line": line}
        return {
            **_sample_view(t, side, url),
            "host": where[0],
            "run_id": where[1],
            "line": line,
            "href": page_url("/sample", **url),
        }

    sa, sb = await asyncio.gather(one("a", a), one("b", b))
    answer_a = "" if sa is None else sa["final_answer"]
    answer_b = "" if sb is None else sb["final_answer"]
    diff = list(
        difflib.unified_diff(
            answer_a.splitlines(),
            answer_b.splitlines(),
            fromfile=f"A {a[0]}/{a[1]}".strip(),
            tofile=f"B {b[0]}/{b[1]}".strip(),
            lineterm="",
            n=3,
        )
    )
    if wants_json(request):
        return json_response(
            {
                "benchmark": benchmark,
                "a": None if sa is None else {k: v for k, v in sa.items() if k != "href"},
                "b": None if sb is None else {k: v for k, v in sb.items() if k != "href"},
                "diff": diff,
                "same_answer": answer_a == answer_b,
            }
        )
    diff_lines = [
        {
            "text": d,
            "kind": "hunk"
            if d.startswith("@@")
            else "add"
            if d.startswith("+") and not d.startswith("+++")
            else "del"
            if d.startswith("-") and not d.startswith("---")
            else "",
        }
        for d in diff[:5000]
    ]
    return html(
        request,
        "pair.html",
        benchmark=benchmark,
        a=sa,
        b=sb,
        diff=diff_lines,
        same=answer_a == answer_b,
        back=page_url("/compare", benchmark=benchmark, a_host=a[0], a=a[1], b_host=b[0], b=b[1]),
    )


def add_routes(app: web.Application) -> None:
    """Add the samples, sample and compare routes to ``app``."""
    app[_READERS] = {}
    app[_COMPARISONS] = OrderedDict()
    app.router.add_get("/samples", _samples_page)
    app.router.add_get("/sample", _sample_page)
    app.router.add_get("/sample/text", _sample_text)
    app.router.add_get("/compare", _compare_page)
    app.router.add_get("/compare/pair", _pair_page)
