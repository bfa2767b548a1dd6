"""Measurement 5: cost to the writer, ``EvalStore.write_trajectory`` with the daemon running.

One thread appends trajectories (~1 KiB lines) round-robin to 8 benchmarks of
4 runs through ``EvalStore`` on local disk, as fast as it can, for a fixed
number of lines per phase. Phases alternate: daemon stopped ("idle"), daemon
running as the shipped systemd unit runs it (``Nice=10``, I/O class best-effort
7, set on the child process), daemon running at default scheduling, four
times; the throughput of each phase is lines per second of wall time, and the
figure is the median running throughput over the median idle throughput
(target: at least 0.85 as shipped). The daemon's CPU time during the running
phases divided by the MiB appended gives its CPU cost per MiB (target: at most
0.05 s/MiB). SeaweedFS runs on the same two cores at normal priority: it stands
in for a remote bucket, and its CPU competes with the writer here, not in
production.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psutil

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

    def size() -> int:
        return sum(p.stat().st_size for p in root.rglob("*.jsonl"))

    idle: list[float] = []
    running: dict[str, list[float]] = {"shipped": [], "default": []}
    daemon_cpu_s = 0.0
    appended = 0
    sigterms: list[int] = []
    for _ in range(rounds):
        idle.append(phase())
        for variant in ("shipped", "default"):
            with Daemon(root, state, f"s3://{BUCKET}/writer", bench.s3.endpoint_url) as d:
                if variant == "shipped" and d.ps is not None:
                    d.ps.nice(10)
                    d.ps.ionice(psutil.IOPRIO_CLASS_BE, 7)
                time.sleep(1.5)  # started and caught up with the previous phases' lines
                cpu0, size0 = d.cpu_s(), size()
                running[variant].append(phase())
                time.sleep(1.5)  # the last lines flushed
                daemon_cpu_s += d.cpu_s() - cpu0
                appended += size() - size0
            sigterms.append(d.sigterms)
    shipped = statistics.median(running["shipped"]) / statistics.median(idle)
    default = statistics.median(running["default"]) / statistics.median(idle)
    return {
        "lines_per_phase": lines,
        "idle_lines_per_s": idle,
        "running_lines_per_s": running["shipped"],
        "running_default_lines_per_s": running["default"],
        "ratio": shipped,
        "ratio_default_scheduling": default,
        "target": 0.85,
        "daemon_cpu_s_during_running_phases": daemon_cpu_s,
        "mib_appended": appended / 2**20,
        "daemon_cpu_s_per_mib": daemon_cpu_s / max(appended / 2**20, 1e-9),
        "target_cpu_s_per_mib": 0.05,
        "sigterms_needed_to_stop": sigterms,
    }
