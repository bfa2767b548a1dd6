"""Measurement 5: cost to the writer, ``EvalStore.write_trajectory`` with the daemon running.

One thread appends trajectories (~1 KiB lines) round-robin to 8 benchmarks of
4 runs through ``EvalStore`` on local disk, as fast as it can, for a fixed
number of lines per phase. Phases alternate: daemon stopped ("idle"), daemon
running (mirroring to S3 at its default flush interval), four times; the
throughput of each phase is lines per second of wall time, and the figure is
the median running throughput over the median idle throughput.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import BUCKET, Bench, Daemon
from evalsyncd.store import EvalStore, StoredTrajectory, StoredTurn

__all__ = ["run"]


def run(bench: Bench) -> dict[str, Any]:
    """Run measurement 5."""
    lines, rounds = (4_000, 2) if bench.quick else (15_000, 4)
    root = bench.dir("writer/root")
    state = bench.dir("writer/state")
    store = EvalStore(root)
    targets = []
    for r in range(4):
        run_id = store.create_run("m", ["b0", "b1"], run_id=f"run{r}")
        targets += [(run_id, "b0"), (run_id, "b1")]
    traj = StoredTrajectory(
        idx=0,
        benchmark="b0",
        turns=[StoredTurn(role="assistant", content="x" * 900, token_count=200)],
    )

    def phase() -> float:
        t0 = time.perf_counter()
        for i in range(lines):
            run_id, b = targets[i % len(targets)]
            traj.idx = i
            store.write_trajectory(run_id, b, traj)
        return lines / (time.perf_counter() - t0)

    idle: list[float] = []
    running: list[float] = []
    daemon_cpu_s = 0.0
    sigterms: list[int] = []
    for _ in range(rounds):
        idle.append(phase())
        with Daemon(root, state, f"s3://{BUCKET}/writer", bench.s3.endpoint_url) as d:
            time.sleep(1.5)  # started and caught up with the previous phases' lines
            cpu0 = d.cpu_s()
            running.append(phase())
            daemon_cpu_s += d.cpu_s() - cpu0
        sigterms.append(d.sigterms)
    ratio = statistics.median(running) / statistics.median(idle)
    return {
        "lines_per_phase": lines,
        "idle_lines_per_s": idle,
        "running_lines_per_s": running,
        "ratio": ratio,
        "target": 0.95,
        "daemon_cpu_s_during_running_phases": daemon_cpu_s,
        "sigterms_needed_to_stop": sigterms,
    }
