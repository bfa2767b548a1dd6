"""``evalsyncd runs report``: one self-contained HTML page of a fleet's runs.

:func:`render_report` turns run rows (the dicts of ``evalsyncd runs ls
--json``: ``host``, ``run_id``, ``model_name``, ``checkpoint_name``,
``timestamp``, ``benchmarks``, ``scores``) into one HTML document that needs no
network: inline CSS, inline SVG plots drawn here, no script. It holds:

- a table of the runs (host, model, checkpoint, run id, time, one column per
  benchmark with the score, ``-`` when not finalized), newest first;
- per benchmark, a plot of score against checkpoint, one line per model.
  Checkpoints are ordered by the numbers in their names (``step100`` after
  ``step20``), then by name; a checkpoint evaluated several times (on several
  hosts) is plotted at the mean of its scores.

Elements carry ``data-*`` attributes (``data-benchmark``, ``data-model``,
``data-checkpoint``, ``data-score``) so tests and scripts can read the
numbers back from the rendered page.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["checkpoint_sort_key", "render_report", "score_figures"]

PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
"""Line colours, one per model in order of first appearance (then cycled)."""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px 32px;
color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#57606a;margin:0 0 16px}
.plots{display:flex;flex-wrap:wrap;gap:18px}
figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:8px 10px;background:#fff}
figcaption{font-weight:600;margin:0 0 2px}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #d8dee4;padding:4px 10px;text-align:left;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:hover td{background:#f6f8fa}
.muted{color:#8c959f}
svg text{font:11px system-ui,sans-serif;fill:#57606a}
svg .legend text{fill:#1b1f24}
"""


def checkpoint_sort_key(name: str | None) -> tuple[Any, ...]:
    """Natural order of checkpoint names: ``step20 < step100``; ``None`` (base) first."""
    if name is None:
        return ((-1,),)
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def _fmt(score: Any) -> str:
    if isinstance(score, int | float) and not isinstance(score, bool):
        return f"{score:.3f}"
    return "-"


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _benchmarks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for b in r.get("benchmarks") or []:
            seen.setdefault(b, None)
        for b in r.get("scores") or {}:
            seen.setdefault(b, None)
    return sorted(seen)


def _series(
    rows: Iterable[Mapping[str, Any]], benchmark: str
) -> tuple[list[str | None], dict[str, dict[str | None, float]]]:
    """Checkpoints (ordered) and, per model, checkpoint -> mean score."""
    sums: dict[str, dict[str | None, list[float]]] = {}
    for r in rows:
        score = (r.get("scores") or {}).get(benchmark)
        if not isinstance(score, int | float) or isinstance(score, bool) or math.isnan(score):
            continue
        per = sums.setdefault(str(r.get("model_name")), {})
        per.setdefault(r.get("checkpoint_name"), []).append(float(score))
    checkpoints = sorted({c for per in sums.values() for c in per}, key=checkpoint_sort_key)
    means = {m: {c: sum(v) / len(v) for c, v in per.items()} for m, per in sums.items()}
    return checkpoints, means


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if hi - lo < 1e-9:
        return lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def _plot(
    benchmark: str,
    rows: Sequence[Mapping[str, Any]],
    colors: Mapping[str, str],
    href: Callable[[str, str | None], str | None] | None = None,
) -> str:
    """One benchmark's score-by-checkpoint SVG figure.

    ``href(model, checkpoint)``, when given, is the (already quoted) URL each
    point links to (``evalsyncd view`` opens the run); ``None`` leaves a point
    unlinked.
    """
    checkpoints, means = _series(rows, benchmark)
    width, height = 420, 270
    left, right, top, bottom = 48, 12, 14, 64
    legend_h = 18 * len(means)
    pw, ph = width - left - right, height - top - bottom
    total_h = height + legend_h
    out = [
        f'<figure data-benchmark="{_e(benchmark)}"><figcaption>{_e(benchmark)}</figcaption>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" role="img" class="plot" '
        f'data-benchmark="{_e(benchmark)}" aria-label="{_e(benchmark)}: score by checkpoint">',
    ]
    if not checkpoints:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no scores yet</text>'
        )
        out.append("</svg></figure>")
        return "".join(out)
    values = [v for per in means.values() for v in per.values()]
    lo, hi = _nice_range(min(values), max(values))

    def x(i: int) -> float:
        return left + (pw * (i + 0.5) / len(checkpoints))

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    for k in range(6):  # grid and y ticks
        v = lo + (hi - lo) * k / 5
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#eaeef2"/><text x="{left - 6}" y="{y(v) + 4:.1f}" '
            f'text-anchor="end">{v:.2f}</text>'
        )
    out.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#afb8c1"/>'
    )
    step = max(1, math.ceil(len(checkpoints) / 12))
    for i, c in enumerate(checkpoints):
        if i % step:
            continue
        label = "base" if c is None else c
        out.append(
            f'<text x="{x(i):.1f}" y="{top + ph + 14}" text-anchor="end" '
            f'transform="rotate(-35 {x(i):.1f} {top + ph + 14})">{_e(label)}</text>'
        )
    for model, per in means.items():
        color = colors[model]
        pts = [(x(i), y(per[c]), c, per[c]) for i, c in enumerate(checkpoints) if c in per]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in pts)
        out.append(
            f'<g class="series" data-model="{_e(model)}"><polyline points="{path}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        for px, py, c, v in pts:
            link = href(model, c) if href is not None else None
            point = (
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}" '
                f'data-model="{_e(model)}" data-checkpoint="{_e(c)}" data-score="{v!r}">'
                f"<title>{_e(model)} @ {_e(c or 'base')}: {v:.3f}</title></circle>"
            )
            out.append(f'<a href="{_e(link)}">{point}</a>' if link else point)
        out.append("</g>")
    out.append('<g class="legend">')
    for k, model in enumerate(sorted(means)):
        ly = height + 18 * k
        out.append(
            f'<rect x="{left}" y="{ly - 9}" width="14" height="4" fill="{colors[model]}"/>'
            f'<text x="{left + 20}" y="{ly}">{_e(model)}</text>'
        )
    out.append("</g></svg></figure>")
    return "".join(out)


def _colors(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    colors: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: str(r.get("model_name"))):
        colors.setdefault(str(r.get("model_name")), PALETTE[len(colors) % len(PALETTE)])
    return colors


def score_figures(
    rows: Sequence[Mapping[str, Any]],
    *,
    href: Callable[[str, str | None], str | None] | None = None,
) -> list[tuple[str, str]]:
    """Per benchmark (sorted), its score-by-checkpoint ``<figure>`` (HTML, escaped).

    The same plots as :func:`render_report`'s; ``href(model, checkpoint)``
    gives the URL a point links to (``None``: no link).
    """
    colors = _colors(rows)
    return [(b, _plot(b, rows, colors, href)) for b in _benchmarks(rows)]


def render_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Evaluation runs",
    sources: Sequence[str] = (),
    problems: Sequence[str] = (),
) -> str:
    """The report page.

    Args:
        rows: run dicts, as ``evalsyncd runs ls --json`` prints them.
        title: the page title.
        sources: the URIs read (listed under the title).
        problems: one line per problem (shown as a warning): a host that could not
            be read, a host read from its plain objects because its tail log is
            damaged, a key that was skipped (each line names its URL).

    Returns:
        The HTML document (UTF-8 text, self-contained).
    """
    benchmarks = _benchmarks(rows)
    colors = _colors(rows)
    hosts = sorted({str(r.get("host", "")) for r in rows})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub" id="summary" data-runs="{len(rows)}" data-hosts="{len(hosts)}">'
        f"{len(rows)} runs on {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
        f"{' from ' + ', '.join(_e(s) for s in sources) if sources else ''}</p>",
    ]
    if problems:
        parts.append(
            '<div class="problems" style="color:#9a3412"><b>Not read, or read in part:</b><ul>'
        )
        parts.extend(f"<li>{_e(p)}</li>" for p in problems)
        parts.append("</ul></div>")
    parts.append('<h2>Score by checkpoint</h2><div class="plots">')
    parts.extend(_plot(b, rows, colors) for b in benchmarks)
    parts.append("</div><h2>Runs</h2>")
    parts.append('<table id="runs"><thead><tr><th>host</th><th>model</th><th>checkpoint</th>')
    parts.extend(f'<th class="num">{_e(b)}</th>' for b in benchmarks)
    parts.append("<th>run id</th><th>created</th></tr></thead><tbody>")
    for r in rows:
        scores = r.get("scores") or {}
        parts.append(
            f'<tr data-run-id="{_e(r.get("run_id"))}" data-host="{_e(r.get("host", ""))}">'
            f"<td>{_e(r.get('host', '')) or '<span class=muted>-</span>'}</td>"
            f"<td>{_e(r.get('model_name'))}</td>"
            f"<td>{_e(r.get('checkpoint_name') or 'base')}</td>"
        )
        for b in benchmarks:
            s = scores.get(b)
            attr = f' data-score="{s!r}"' if _fmt(s) != "-" else ""
            parts.append(f'<td class="num" data-benchmark="{_e(b)}"{attr}>{_fmt(s)}</td>')
        parts.append(
            f"<td><code>{_e(r.get('run_id'))}</code></td><td>{_e(r.get('timestamp'))}</td></tr>"
        )
    parts.append("</tbody></table></body></html>\n")
    return "".join(parts)
