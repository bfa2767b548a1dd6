"""Write ``docs/benchmarks.md`` and one matplotlib PNG per measurement from a run's results."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import aws_version, rclone_version

__all__ = ["write_report"]


def _f(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    facts = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem}",
        f"- OS: {platform.platform()}; Python {sys.version.split()[0]}",
        f"- evalsyncd commit {commit or 'unknown'}; servers: SeaweedFS `weed mini` (S3), "
        "fake-gcs-server (GCS), both on loopback",
    ]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        facts.append(
            f"- peers: {aws_version()}; {rclone_version()}; tinker-cookbook 0.6.1 "
            "`FsspecStorage` over s3fs"
        )
    return facts


def _plot(path: Path, draw: Callable[[Any], None]) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _err(res: dict[str, Any]) -> str | None:
    return f"Failed: `{res['error']}`" if "error" in res else None


def _wire(res: dict[str, Any], img: Path) -> list[str]:
    out = []
    targets = {
        ("evalsyncd (GCS)", 8): 1.1,
        ("evalsyncd (GCS)", 64): 1.1,
        ("evalsyncd (S3)", 8): 2.0,
        ("evalsyncd (S3)", 64): 1.15,
    }
    for label, rows in res.items():
        mib = int(label.split()[0])
        table = []
        for tool, r in rows.items():
            if "ratio" not in r:
                table.append([tool, r.get("error") or r.get("skipped", ""), "", "", "", ""])
                continue
            t = targets.get((tool, mib))
            table.append(
                [
                    tool,
                    f"{r['ratio']:.2f}x",
                    _f(r.get("bytes_up", "")),
                    _f(r.get("bytes_down", "")),
                    _f(r.get("requests_per_step", ""), 1),
                    f"<= {t}x: {_verdict(r['ratio'] <= t)}" if t else "",
                ]
            )
        out += [
            f"**{label}**",
            "",
            _table(
                [
                    "tool",
                    "wire bytes / appended byte",
                    "bytes up",
                    "bytes down",
                    "requests/step",
                    "target",
                ],
                table,
            ),
            "",
        ]

    def draw(ax: Any) -> None:
        labels = list(res)
        tools = [t for t in next(iter(res.values()))]
        width = 0.8 / len(tools)
        for i, tool in enumerate(tools):
            ys = [res[lbl].get(tool, {}).get("ratio", 0) for lbl in labels]
            ax.bar([x + i * width for x in range(len(labels))], ys, width, label=tool)
        ax.set_yscale("log")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
        ax.set_ylabel("wire bytes per appended byte (log)")
        ax.legend(fontsize=7)

    _plot(img, draw)
    return out


def _fresh(res: dict[str, Any], img: Path) -> list[str]:
    def row(who: str, n: Any, p50: Any, p99: Any, mx: Any, target: float) -> list[Any]:
        if p99 is None:
            return [who, res["files"], res["lines_per_s"], n, "-", "-", "-", "-", "not measured"]
        return [
            who,
            res["files"],
            res["lines_per_s"],
            n,
            f"{p50:.2f} s",
            f"{p99:.2f} s",
            f"{mx:.2f} s",
            f"{res['poll_round_s_median'] * 1000:.0f} ms",
            f"<= {target} s: {_verdict(p99 <= target)}",
        ]

    out = [
        _table(
            [
                "reader",
                "files",
                "lines/s",
                "lines measured",
                "p50",
                "p99",
                "max",
                "poll round",
                "target p99",
            ],
            [
                row(
                    "evalsyncd (main + tail)",
                    res["measured_lines"],
                    res["p50_s"],
                    res["p99_s"],
                    res["max_s"],
                    res["target_p99_s"],
                ),
                row(
                    "plain (main object)",
                    res.get("plain_measured_lines", 0),
                    res.get("plain_p50_s"),
                    res.get("plain_p99_s"),
                    res.get("plain_max_s"),
                    res.get("target_plain_p99_s", 62.0),
                ),
            ],
        ),
        "",
    ]
    lat = res.get("latencies", [])

    def draw(ax: Any) -> None:
        ax.hist(lat, bins=60)
        ax.axvline(res["target_p99_s"], color="r", linestyle="--", label="target p99")
        ax.set_xlabel("write -> visible in bucket (s)")
        ax.set_ylabel("lines")
        ax.legend()

    _plot(img, draw)
    return out


def _backfill(res: dict[str, Any], img: Path) -> list[str]:
    tools = res["tools"]
    ours = tools["evalsyncd sync --once"]["files_per_s"]
    rclone = tools["rclone copy"]
    rows = [
        [
            n,
            f"{r['wall_s']:.2f} s",
            f"{r['files_per_s']:.0f}",
            f"{r['cpu_s']:.2f} s" if "cpu_s" in r else "",
            r["objects"],
            f"{ours / r['files_per_s']:.2f}x",
        ]
        for n, r in tools.items()
    ]
    speed = ours / rclone["files_per_s"]
    out = [
        f"{res['runs']} runs, {res['files']} files; "
        + (f"median of {res['rounds']} rounds" if res.get("rounds", 1) > 1 else "one round")
        + ", the tools taking turns. Target: every plain object in place at least "
        f"1.0x rclone's speed: **{speed:.2f}x**, {_verdict(speed >= 1.0)}.",
        "",
        _table(
            ["tool", "wall (median)", "files/s", "CPU (tool)", "objects", "evalsyncd speed / tool"],
            rows,
        ),
        "",
    ]
    sdk = tools.get("SDK PutObject x8")
    if sdk is not None:
        out += [
            "The SDK's ceiling (`SDK PutObject x8`: aiobotocore alone, as `S3Storage` sets "
            f"it up, no journal) runs at {sdk['files_per_s'] / rclone['files_per_s']:.2f}x "
            f"rclone's speed; evalsyncd at {ours / sdk['files_per_s']:.2f}x the ceiling.",
            "",
        ]
    daemon = res.get("daemon", {})
    if daemon:
        listed = daemon.get("all_runs_listed_s", float("nan"))
        goal = rclone["wall_s"] / 3
        starts = daemon.get("all_runs_listed_s_all", [listed])
        each = ", ".join(f"{x:.2f}" for x in starts)
        out += [
            "`evalsyncd run` from scratch (tail log and catalog): `EvalStore` on the bucket "
            f"lists every run after **{listed:.2f} s** (median of {len(starts)} starts: "
            f"{each} s; target: a third of rclone's "
            f"{rclone['wall_s']:.2f} s, {goal:.2f} s: {_verdict(listed <= goal)}; "
            f"{rclone['wall_s'] / listed:.1f}x sooner than rclone finishes); every main "
            f"object exists after **{daemon.get('all_main_objects_s', float('nan')):.1f} s** "
            "(the main objects of a finalized run are due at once; `runs.jsonl` when quiet).",
            "",
        ]

    def draw(ax: Any) -> None:
        ax.barh(list(tools), [r["files_per_s"] for r in tools.values()])
        ax.set_xlabel("files per second (higher is better)")

    _plot(img, draw)
    return out


def _readback(res: dict[str, Any], img: Path) -> list[str]:
    rows = [
        [
            k,
            v["runs"],
            v["items"],
            f"{v['reference_s']:.3f} s",
            f"{v['evalsyncd_s']:.3f} s",
            f"{v['speedup']:.2f}x",
            _f(v["reference_requests"], 0),
            _f(v["evalsyncd_requests"], 0),
        ]
        for k, v in res.items()
    ]
    out = [
        _table(
            [
                "case @ added RTT",
                "runs",
                "items",
                "sequential reader",
                "EvalStore",
                "speedup",
                "requests (ref)",
                "requests (EvalStore)",
            ],
            rows,
        ),
        "",
    ]

    def draw(ax: Any) -> None:
        keys = list(res)
        ax.bar(
            [i - 0.2 for i in range(len(keys))],
            [res[k]["reference_s"] for k in keys],
            0.4,
            label="sequential reader",
        )
        ax.bar(
            [i + 0.2 for i in range(len(keys))],
            [res[k]["evalsyncd_s"] for k in keys],
            0.4,
            label="EvalStore",
        )
        ax.set_xticks(range(len(keys)), keys, fontsize=7)
        ax.set_ylabel("seconds (lower is better)")
        ax.legend()

    _plot(img, draw)
    return out


def _writer(res: dict[str, Any], img: Path) -> list[str]:
    ok = res["ratio"] >= res["target"]
    idle, run = res["idle_lines_per_s"], res["running_lines_per_s"]
    default = res.get("running_default_lines_per_s", [])
    cpu_ok = res.get("daemon_cpu_s_per_mib", 1.0) <= res.get("target_cpu_s_per_mib", 0.05)
    out = [
        _table(
            ["phase", *[f"#{i + 1}" for i in range(len(idle))]],
            [
                ["daemon stopped (lines/s)", *[f"{x:,.0f}" for x in idle]],
                ["daemon running as shipped, Nice=10 (lines/s)", *[f"{x:,.0f}" for x in run]],
                ["daemon running, default scheduling (lines/s)", *[f"{x:,.0f}" for x in default]],
            ],
        ),
        "",
        f"Ratio running / stopped (medians): as shipped **{res['ratio']:.3f}** (target >= "
        f"{res['target']}: {_verdict(ok)}); default scheduling "
        f"{res.get('ratio_default_scheduling', float('nan')):.3f}. Daemon CPU during the "
        f"running phases {res['daemon_cpu_s_during_running_phases']:.1f} s for "
        f"{res.get('mib_appended', 0):.1f} MiB appended: "
        f"**{res.get('daemon_cpu_s_per_mib', float('nan')):.3f} s/MiB** (target <= "
        f"{res.get('target_cpu_s_per_mib', 0.05)}: {_verdict(cpu_ok)}).",
        "",
    ]

    def draw(ax: Any) -> None:
        ax.plot(range(1, len(idle) + 1), idle, "o-", label="daemon stopped")
        ax.plot(range(1, len(run) + 1), run, "s-", label="daemon running")
        ax.set_xlabel("phase")
        ax.set_ylabel("write_trajectory lines/s")
        ax.set_ylim(bottom=0)
        ax.legend()

    _plot(img, draw)
    return out


def _footprint(res: dict[str, Any], img: Path) -> list[str]:
    idle = res["idle"]
    rows = [
        [
            f"idle, {res['files']:,} files watched",
            f"{idle['rss_mib']:.0f} MiB",
            f"{idle['cpu_percent']:.1f} %",
            "",
            "",
        ]
    ]
    for b in res["backlogs"]:
        rows.append(
            [
                f"catching up {b['backlog_mib']} MiB",
                f"{b['peak_rss_mib']:.0f} MiB (peak)",
                f"{b['cpu_percent']:.0f} %",
                f"{b['catch_up_s']:.1f} s",
                f"{b['mib_per_s']:.0f} MiB/s",
            ]
        )
    rs = res["rescan"]
    grows = res["rss_growth_ratio"]
    out = [
        _table(["state", "RSS", "CPU (of one core)", "catch-up", "throughput"], rows),
        "",
        f"Peak RSS at the full backlog / at a quarter of it: **{grows:.2f}** "
        f"(memory must not grow with the backlog: {_verdict(grows < 1.25)}). "
        f"Initial sync of the {res['files']:,} small files: {res['initial_sync_s']:.1f} s.",
        "",
        f"Rescan of {rs['files']:,} files (empty journal): **{rs['rescan_s']:.2f} s**; a bare "
        f"`os.scandir` + `stat` walk: {rs['walk_stat_s']:.2f} s (ratio {rs['ratio']:.1f}x).",
        "",
    ]

    def draw(ax: Any) -> None:
        for b in res["backlogs"]:
            s = b.get("rss_series", [])
            ax.plot([t for t, _ in s], [r for _, r in s], label=f"{b['backlog_mib']} MiB backlog")
        ax.axhline(idle["rss_mib"], color="gray", linestyle=":", label="idle")
        ax.set_xlabel("seconds since the backlog appeared")
        ax.set_ylabel("daemon RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.legend()

    _plot(img, draw)
    return out


def _requests(res: dict[str, Any], img: Path) -> list[str]:
    rows = []
    for k, v in res.items():
        target = ""
        if v.get("files") == 50 and v.get("mode") == "tail log":
            target = "<= 5 /s " + _verdict(v.get("requests_per_s", 99) <= 5.0)
        rows.append(
            [
                k,
                _f(v.get("requests_per_s", v.get("error", "")), 1),
                _f(v.get("requests_per_hour", ""), 0),
                _f(v.get("requests_per_file_hour", ""), 0),
                _f(v.get("bytes_per_hour", "") and v["bytes_per_hour"] / 2**20, 1),
                target,
            ]
        )
    out = [
        _table(
            [
                "files, destination, design",
                "requests / s",
                "requests / hour",
                "requests / file-hour",
                "MiB on the wire / hour",
                "target",
            ],
            rows,
        ),
        "",
    ]

    def draw(ax: Any) -> None:
        series = [
            (
                f"{mode} ({label})",
                style,
                lambda k, v, m=mode, lb=label: v.get("mode") == m and lb in k,
            )
            for mode, style in (("tail log", "o-"), ("per-file", "s--"))
            for label in ("S3", "GCS")
        ]
        series.append(("aws s3 sync", "x:", lambda k, v: v.get("mode") == "aws s3 sync"))
        for name, style, keep in series:
            pts = sorted(
                (v["files"], v["requests_per_s"])
                for k, v in res.items()
                if "requests_per_s" in v and keep(k, v)
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("growing files")
        ax.set_ylabel("HTTP requests per second (lower is cheaper)")
        ax.legend(fontsize=7)

    _plot(img, draw)
    return out


def _sdkcpu(res: dict[str, Any], img: Path) -> list[str]:
    variants = res["variants"]
    rows = []

    def vs(v: dict[str, Any], ref: str) -> str:
        return f"{(v[f'vs_{ref}'] - 1) * 100:+.0f} %" if f"vs_{ref}" in v else ""

    for key, v in variants.items():
        if "cpu_ms_per_put" not in v:
            rows.append([key, v["label"], "", v.get("error", ""), "", "", "", "", ""])
            continue
        ver = v["versions"]
        rows.append(
            [
                key,
                v["label"],
                f"{ver['botocore']} / {ver['aiobotocore']} / {ver['aioboto3'] or '-'}",
                f"{v['cpu_ms_per_put']:.3f} ({v['cpu_ms_min']:.3f}-{v['cpu_ms_max']:.3f})",
                f"{v['user_ms_per_put']:.3f} / {v['sys_ms_per_put']:.3f}",
                f"{v['wall_ms_per_put']:.3f}",
                vs(v, "a"),
                vs(v, "b"),
                f"{v['retries']} / {', '.join(map(str, v['objects_per_run']))}",
            ]
        )
    out = [
        f"{res['puts']:,} PutObject calls of {res['size']} bytes, {res['inflight']} in flight, "
        f"after {res['warmup']} unmeasured; each run in a fresh process; median of "
        f'{res["rounds"]} round(s) (range in brackets); "vs" columns: median of the '
        "per-round CPU ratios.",
        "",
        _table(
            [
                "variant",
                "client",
                "botocore / aiobotocore / aioboto3",
                "CPU ms / put",
                "user / sys ms",
                "wall ms / put",
                "CPU vs a",
                "CPU vs b",
                "retries / objects per run",
            ],
            rows,
        ),
        "",
    ]
    for key in ("b", "c", "e"):
        check = variants.get(key, {}).get("verify")
        if check:
            out += [
                f"Checksum check ({key}): a wrong `ChecksumCRC32C` was "
                + (
                    f"rejected ({check.get('wrong_error')}, HTTP {check.get('wrong_status')})"
                    if check["wrong_rejected"]
                    else "**accepted**"
                )
                + (", object left behind" if check["wrong_left_object"] else ", no object left")
                + "; the right one was stored with it: "
                + ("yes" if check["right_checksum_matches"] else "**no**")
                + ".",
                "",
            ]

    def draw(ax: Any) -> None:
        keys = [k for k in variants if "cpu_ms_per_put" in variants[k]]
        ax.barh(keys, [variants[k]["cpu_ms_per_put"] for k in keys])
        ax.invert_yaxis()
        ax.set_xlabel("process CPU ms per PutObject (lower is better)")

    _plot(img, draw)
    return out


def _fleet(res: dict[str, Any], img: Path) -> list[str]:
    rows = [
        [
            k,
            f"{v['reference_s']:.3f} s",
            f"{v['evalsyncd_s']:.3f} s",
            f"{v['speedup']:.1f}x",
            f">= {v['target_speedup']:.0f}x {_verdict(v['ok'])}" if v["target_speedup"] else "-",
            _f(v["reference_requests"], 0),
            _f(v["evalsyncd_requests"], 0),
            _f(v["evalsyncd_requests_per_host"], 1),
        ]
        for k, v in res.items()
    ]
    out = [
        _table(
            [
                "case @ added RTT",
                "reference EvalStore",
                "evalsyncd",
                "speedup",
                "target",
                "requests (ref)",
                "requests (evalsyncd)",
                "per host",
            ],
            rows,
        ),
        "",
    ]

    def draw(ax: Any) -> None:
        keys = list(res)
        ax.barh(keys, [res[k]["speedup"] for k in keys])
        ax.set_xscale("log")
        ax.set_xlabel("speedup over the reference EvalStore (higher is better)")
        ax.tick_params(axis="y", labelsize=6)

    _plot(img, draw)
    return out


def _samples(res: dict[str, Any], img: Path) -> list[str]:
    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f} s"

    rows = [
        [
            r["case"],
            secs(r["reference_s"]),
            secs(r["evalsyncd_s"]),
            "-" if r["speedup"] is None else f"{r['speedup']:.1f}x",
            r["target"] if r["ok"] is None else f"{r['target']} {_verdict(r['ok'])}",
            "-" if r["requests"] is None else _f(r["requests"], 0),
            "-" if r["mib_fetched"] is None else f"{r['mib_fetched']:,.2f}",
            r["note"],
        ]
        for r in res["rows"]
    ]
    out = [
        f"All reads from S3 through the proxy at {res['rtt_ms']:.0f} ms added RTT.",
        "",
        _table(
            [
                "case",
                "today's reader",
                "evalsyncd.samples",
                "speedup",
                "target",
                "requests",
                "MiB fetched",
                "notes",
            ],
            rows,
        ),
        "",
    ]

    def draw(ax: Any) -> None:
        timed = [r for r in res["rows"] if r["reference_s"] is not None]
        keys = [r["case"][:40] for r in timed]
        ax.barh(
            [i + 0.2 for i in range(len(keys))],
            [r["reference_s"] for r in timed],
            0.4,
            label="today's reader",
        )
        ax.barh(
            [i - 0.2 for i in range(len(keys))],
            [r["evalsyncd_s"] for r in timed],
            0.4,
            label="evalsyncd.samples",
        )
        ax.set_yticks(range(len(keys)), keys, fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (lower is better)")
        ax.legend()

    _plot(img, draw)
    return out


def _spread(median: float, values: list[float] | None) -> str:
    """``0.512 s`` or, with several values, ``0.512 s (min 0.4, max 0.7)``."""
    if not values or len(values) < 2:
        return f"{median:.3f} s"
    return f"{median:.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def _view(res: dict[str, Any], img: Path) -> list[str]:
    fs, live = res["first_screen"], res["live"]
    out = [
        f"First screen: `evalsyncd view` of a fleet of {fs['hosts']} hosts x "
        f"{fs['runs'] // fs['hosts']} runs, `GET /` until its HTML (first 200 rows) is received, "
        f"fresh server each time (median of {fs.get('repeats', 3)}); then the live fragment "
        "`view.js` fetches next, which waits for the whole listing (complete list, from the first "
        "request). The reference EvalStore lists host after host "
        f"(measured on {fs['reference_measured_hosts']} hosts, {fs['reference_measured_s']:.2f} s, "
        "scaled to the fleet).",
        "",
        _table(
            ["case @ 20 ms RTT", "reference EvalStore", "evalsyncd view", "speedup", "target"],
            [
                [
                    "first screen",
                    f"{fs['reference_s']:.2f} s",
                    _spread(fs["evalsyncd_s"], fs.get("evalsyncd_s_all")),
                    f"{fs['speedup']:.0f}x",
                    f"<= {fs['target_s']} s "
                    f"{_verdict(max(fs.get('evalsyncd_s_all') or [fs['evalsyncd_s']]) <= fs['target_s'])}",
                ],
                *(
                    [
                        [
                            f"complete list ({fs['runs']:,} runs)",
                            f"{fs['reference_s']:.2f} s",
                            _spread(fs["complete_s"], fs.get("complete_s_all")),
                            f"{fs['reference_s'] / fs['complete_s']:.0f}x",
                            "-",
                        ]
                    ]
                    if "complete_s" in fs
                    else []
                ),
                [
                    "requests",
                    _f(fs["reference_requests"], 0),
                    f"{_f(fs['evalsyncd_requests'], 0)} ({fs['evalsyncd_requests_per_host']:.2f} per host"
                    " + 2 for the fleet prefix)",
                    "-",
                    f"<= {fs['target_requests_per_host']:.0f} per host "
                    f"{_verdict(fs['evalsyncd_requests_per_host'] <= fs['target_requests_per_host'])}",
                ],
            ],
        ),
        "",
        *(
            [
                f"In {fs['first_partial']} of the {fs.get('repeats', 3)} first screens the "
                "listing was still going on: the page showed the runs of the hosts listed so far "
                "(the first host is listed alone first) and said so; the others were complete.",
                "",
            ]
            if "first_partial" in fs
            else []
        ),
        f"Live: a sample written on a host under a running daemon (flush_interval_s = "
        f"{live['flush_interval_s']} s, through the 20 ms proxy) shows in an open samples page "
        f"(its live fragment polled every {live.get('poll_s', live['refresh_s'])} s, as `view.js` "
        "does in a samples page).",
        "",
        _table(
            ["samples", "missing", "p50", "p95", "max", "target (p95)"],
            [
                [
                    live["samples"],
                    live["missing"],
                    f"{live['p50_s']:.2f} s",
                    f"{live['p95_s']:.2f} s",
                    f"{live['max_s']:.2f} s",
                    f"<= {live['target_s']:.1f} s {_verdict(live['ok'])}",
                ]
            ],
        ),
        "",
    ]

    def draw(ax: Any) -> None:
        labels = ["reference EvalStore (scaled)", "evalsyncd view"]
        ax.barh(labels, [fs["reference_s"], fs["evalsyncd_s"]])
        ax.set_xscale("log")
        ax.set_xlabel(f"first screen of {fs['runs']} runs, seconds (lower is better)")

    _plot(img, draw)
    return out


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], Path], list[str]]]] = {
    "wire": ("1. Bytes on the wire per appended byte", _wire),
    "freshness": ("2. Freshness: write to visible in the bucket", _fresh),
    "backfill": ("3. Backfill from scratch", _backfill),
    "readback": ("4. Reading back", _readback),
    "writer": ("5. Cost to the writer", _writer),
    "footprint": ("6. Footprint", _footprint),
    "requests": ("7. Requests by number of growing files", _requests),
    "sdkcpu": ("8. CPU per S3 request, by client", _sdkcpu),
    "fleet": ("9. Reading the fleet: 8 hosts x 40 runs, and one host of 300", _fleet),
    "samples": ("10. Samples: a big file, a 50 MB sample, compare, bulk reads", _samples),
    "view": ("11. evalsyncd view: first screen of a big fleet, live samples", _view),
}


def write_report(
    results: dict[str, dict[str, Any]],
    out: Path,
    *,
    quick: bool,
    total_s: float,
    durations: dict[str, float],
) -> Path:
    """Write ``out/benchmarks.md`` and ``out/benchmarks/*.png``; returns the markdown path."""
    import bench

    img_dir = out / "benchmarks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mode = "`python -m bench --quick`" if quick else "`python -m bench`"
    md = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench`; do not edit by hand. -->",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by {mode} "
        f"({'quick' if quick else 'full'} mode) in {total_s / 60:.1f} minutes. Rerun with "
        "`make bench` (full; the target is < 15 min on an idle 2-core machine) or `make bench-quick` "
        "(< 3 min); raw figures are in "
        "[`benchmarks/results.json`](benchmarks/results.json). How each figure is measured is "
        "in the docstring of its module under `bench/`.",
        "",
        "## Machine",
        "",
        *_machine(),
        "",
        (bench.__doc__ or "").strip(),
        "",
    ]
    for key, (title, render) in SECTIONS.items():
        if key not in results:
            continue
        res = results[key]
        md += [
            f"## {title}",
            "",
            f"Measured in {durations.get(key, 0):.0f} s; see `bench/{_module(key)}.py`.",
            "",
        ]
        if (e := _err(res)) is not None:
            md += [e, ""]
            continue
        img = img_dir / f"{key}.png"
        try:
            md += render(res, img)
            md += [f"![{title}](benchmarks/{img.name})", ""]
        except Exception as exc:  # a broken plot must not lose the numbers
            md += [f"Report failed: `{type(exc).__name__}: {exc}`", ""]
    path = out / "benchmarks.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def _module(key: str) -> str:
    return {"requests": "reqrate"}.get(key, key)
