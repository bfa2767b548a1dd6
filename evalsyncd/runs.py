"""``evalsyncd runs ls | show``: read evaluation runs from any side of the mirror.

Rows are the dicts of ``evalsyncd runs ls --json``: a run's ``metadata.json``
fields plus ``host`` (the host prefix's name, ``""`` for a single store).

The same reads (:class:`~evalsyncd.store.EvalStoreReader`, which
:class:`~evalsyncd.store.EvalStore` is) serve a local directory, an ``s3://``
or a ``gs://`` location; these helpers turn what they return into JSON-ready
dicts and short text. They only read.
"""

from __future__ import annotations

from typing import Any

from evalsyncd.store import EvalStoreReader

__all__ = ["format_run", "format_runs", "run_details", "runs_table"]


def runs_table(store: EvalStoreReader) -> list[dict[str, Any]]:
    """Every run's metadata, newest first, as dicts.

    Raises:
        StorageError: the storage failed (an outage is never "no runs").
    """
    return [m.to_dict() for m in store.list_runs()]


def format_runs(runs: list[dict[str, Any]]) -> str:
    """One line per run: host (for a fleet), id, model, time, benchmarks and scores."""
    if not runs:
        return "no runs"
    width = max(len(r.get("host", "")) for r in runs)
    lines = []
    for r in runs:
        host = f"{r.get('host', ''):<{width}}  " if width else ""
        scores = ", ".join(f"{b}={s:.3f}" for b, s in sorted(r.get("scores", {}).items()))
        benchmarks = ",".join(r.get("benchmarks", []))
        lines.append(
            f"{host}{r['run_id']}  {r.get('model_name', '')}  {r.get('timestamp', '')}  "
            f"[{benchmarks}]  {scores or 'not finalized'}"
        )
    return "\n".join(lines)


def run_details(store: EvalStoreReader, run_id: str, *, trajectories: int = 0) -> dict[str, Any]:
    """A run's metadata, summary, results and trajectory counts (and the first few).

    Args:
        store: where to read.
        run_id: the run.
        trajectories: how many trajectories of each benchmark to include in full.

    Raises:
        FileNotFoundError: no such run.
        StorageError: the storage failed.
    """
    metadata = store.read_run(run_id)
    benchmarks = sorted(set(metadata.benchmarks) | set(store.list_benchmarks(run_id)))
    out: dict[str, Any] = {
        "url": store.url(f"runs/{run_id}"),
        "metadata": metadata.to_dict(),
        "summary": store.read_summary(run_id),
        "benchmarks": {},
    }
    for benchmark in benchmarks:
        result = store.read_result(run_id, benchmark)
        count = 0
        first = []
        for traj in store.iter_trajectories(run_id, benchmark):
            if count < trajectories:
                first.append(traj.to_dict())
            count += 1
        entry: dict[str, Any] = {
            "result": result.to_dict() if result else None,
            "trajectories": count,
        }
        if trajectories:
            entry["first_trajectories"] = first
        out["benchmarks"][benchmark] = entry
    return out


def format_run(details: dict[str, Any]) -> str:
    """Human-readable text of :func:`run_details`."""
    m = details["metadata"]
    host = f" on host {details['host']}" if details.get("host") else ""
    lines = [
        f"run {m['run_id']}{host} ({details['url']})",
        f"  model: {m.get('model_name')}  checkpoint: {m.get('checkpoint_name') or '-'}",
        f"  created: {m.get('timestamp')}",
    ]
    for name, b in details["benchmarks"].items():
        r = b["result"]
        if r:
            head = (
                f"score {r['score']:.3f} ({r['num_correct']}/{r['num_examples']} correct, "
                f"{r.get('num_errors', 0)} errors)"
            )
        else:
            head = "no result yet"
        lines.append(f"  {name}: {head}, {b['trajectories']} trajectories")
    if m.get("scores"):
        lines.append("  scores: " + ", ".join(f"{k}={v:.3f}" for k, v in m["scores"].items()))
    else:
        lines.append("  scores: not finalized")
    return "\n".join(lines)
