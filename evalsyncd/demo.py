"""``evalsyncd demo``: the whole product on one machine, with no cloud account.

1. starts real local S3 (SeaweedFS) and GCS (fake-gcs-server) servers in a
   temporary directory (from the ``evalsyncd[servers]`` extra);
2. runs a sample eval writer: a few runs through :class:`~evalsyncd.store.EvalStore`,
   trajectories appended over several seconds, results, summaries, ``finalize_run``;
3. runs the daemon (an in-process :class:`~evalsyncd.sync.service.Service`)
   mirroring to both, printing a progress line per second;
4. stops the daemon (SIGTERM semantics: drain, commit), verifies that both
   buckets equal the local tree, and reads a run back from each bucket;
5. stops the servers and removes the directory, also on Ctrl-C.

Exit status 0 when both mirrors verify and read back, else 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from evalsyncd.config import Settings
from evalsyncd.logs import configure_logging
from evalsyncd.runs import format_run, run_details
from evalsyncd.status import format_bytes
from evalsyncd.storage import storage_from_uri
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.sync.service import Service, open_destination_storage
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server, ServerError
from evalsyncd.verify import verify_storage

__all__ = ["run_demo"]

BUCKET = "evalsyncd-demo"
PREFIX = "evals/demo-host"
BENCHMARKS = ("gsm8k", "math")
RUNS = 3


def _say(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Writer:
    """A sample eval job: runs created, trajectories appended over ``seconds``, finalized."""

    def __init__(self, root: Path, seconds: float, abort: threading.Event) -> None:
        self.store = EvalStore(root)
        self.seconds = seconds
        self.abort = abort
        self.runs: list[str] = []
        self.trajectories = 0
        self.finished = False
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self._write()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished = True

    def _write(self) -> None:
        rng = random.Random(7)
        started = time.monotonic()
        per_run_s = self.seconds / RUNS
        for r in range(RUNS):
            run_id = self.store.create_run(
                "demo-model",
                list(BENCHMARKS),
                checkpoint_path=f"/checkpoints/step{(r + 1) * 100}",
                checkpoint_name=f"step{(r + 1) * 100}",
                config={"temperature": 0.0, "max_tokens": 512},
            )
            self.runs.append(run_id)
            correct = dict.fromkeys(BENCHMARKS, 0)
            counts = dict.fromkeys(BENCHMARKS, 0)
            idx = 0
            while time.monotonic() - started < per_run_s * (r + 1) and not self.abort.is_set():
                benchmark = BENCHMARKS[idx % len(BENCHMARKS)]
                ok = rng.random() < 0.4 + 0.15 * r
                traj = StoredTrajectory(
                    idx=counts[benchmark],
                    benchmark=benchmark,
                    example_id=f"{benchmark}-{counts[benchmark]:04d}",
                    turns=[
                        StoredTurn(role="user", content=f"Problem {counts[benchmark]}: 6 x 7 = ?"),
                        StoredTurn(role="assistant", content="42" if ok else "48"),
                    ],
                    reward=1.0 if ok else 0.0,
                    metrics={"correct": float(ok)},
                    time_seconds=round(rng.uniform(0.1, 2.0), 3),
                )
                self.store.write_trajectory(run_id, benchmark, traj)
                counts[benchmark] += 1
                correct[benchmark] += ok
                self.trajectories += 1
                idx += 1
                time.sleep(0.02)
            results = {
                b: BenchmarkResult(
                    name=b,
                    score=correct[b] / counts[b] if counts[b] else 0.0,
                    num_examples=counts[b],
                    num_correct=correct[b],
                )
                for b in BENCHMARKS
            }
            for result in results.values():
                self.store.write_result(run_id, result)
            self.store.write_summary(run_id, results)
            self.store.finalize_run(run_id)
            if self.abort.is_set():
                return


def _local_summary(root: Path) -> tuple[int, int]:
    files = total = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            files += 1
            total += path.stat().st_size
    return files, total


async def _mirror(settings: Settings, writer: _Writer, abort: threading.Event) -> bool:
    """Run the daemon while the writer writes, until everything is mirrored."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        abort.set()
        stop.set()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    loop.add_signal_handler(signal.SIGTERM, interrupt)
    service = Service(settings)
    daemon = asyncio.create_task(service.run(stop), name="daemon")
    thread = threading.Thread(target=writer, name="demo-writer", daemon=True)
    started = time.monotonic()
    try:
        await asyncio.wait_for(service.first_scan_started.wait(), 30.0)
        thread.start()
        last_print = 0.0
        caught_up_since: float | None = None
        while not stop.is_set() and not daemon.done():
            await asyncio.sleep(0.1)
            now = time.monotonic()
            idle = all(d.is_idle() for d in service.destinations.values())
            if writer.finished and idle:
                if caught_up_since is None:
                    await service.rescan()  # scans are the truth: anything left?
                    caught_up_since = now
                elif now - caught_up_since > 2 * settings.flush_interval_s:
                    break
            else:
                caught_up_since = None
            if now - last_print >= 1.0:
                last_print = now
                parts = [
                    f"writer: {len(writer.runs)} runs, {writer.trajectories} trajectories"
                    + (" (done)" if writer.finished else "")
                ]
                for name, d in service.destinations.items():
                    b = service.backlog(name)
                    parts.append(
                        f"{name}: {format_bytes(d.stats.bytes_uploaded)} in "
                        f"{d.stats.objects_uploaded} writes, {b.files} files behind"
                        + (f" [{d.state.value}]" if d.state.value != "healthy" else "")
                    )
                _say(f"  [{now - started:5.1f}s] " + " | ".join(parts))
        stop.set()
        await daemon
    finally:
        stop.set()
        abort.set()
        if not daemon.done():
            await asyncio.gather(daemon, return_exceptions=True)
        if thread.is_alive():
            thread.join(10.0)
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
    if writer.error is not None:
        raise writer.error
    return not interrupted


async def _verify_all(settings: Settings) -> bool:
    ok = True
    for dest in settings.destinations:
        storage = open_destination_storage(dest)
        async with storage:
            report = await verify_storage(
                storage, settings.root, name=dest.name, exclude=(settings.state_dir,)
            )
        methods = ", ".join(f"{n} by {m}" for m, n in sorted(report.methods.items()))
        verdict = "identical" if report.ok else f"{len(report.mismatches)} MISMATCHES"
        _say(f"  {dest.name} {report.url}: {report.checked} files checked ({methods}): {verdict}")
        for m in report.mismatches:
            _say(f"    {m.path}: {m.problem}: {m.detail}")
        ok = ok and report.ok
    return ok


def _read_back(settings: Settings, run_id: str) -> bool:
    ok = True
    for dest in settings.destinations:
        with open_destination_storage(dest) as storage:
            store = EvalStore(storage)
            runs = store.list_runs()
            details = run_details(store, run_id, trajectories=0)
        _say(f"  {dest.name}: {len(runs)} runs listed; newest:")
        _say("    " + format_run(details).replace("\n", "\n    "))
        ok = ok and any(r.run_id == run_id for r in runs)
    return ok


def run_demo(seconds: float = 6.0, keep: Path | None = None) -> int:
    """Run the demo (see the module docstring); returns the exit status."""
    configure_logging("console", "warning")
    # watchdog warns when re-adding a watch for a directory created during its walk: noise here.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"watchdog\.")
    workdir = keep or Path(tempfile.mkdtemp(prefix="evalsyncd-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    abort = threading.Event()
    try:
        with contextlib.ExitStack() as stack:
            _say(f"evalsyncd demo in {workdir}")
            _say("1. starting local object stores")
            # SeaweedFS writes its logs to $TMPDIR: keep them in the demo's directory.
            stack.enter_context(_environment({"TMPDIR": str(workdir)}))
            s3 = stack.enter_context(SeaweedS3Server(workdir / "seaweedfs").start())
            s3.create_bucket(BUCKET)
            gcs = stack.enter_context(FakeGCSServer(workdir / "fake-gcs").start())
            gcs.create_bucket(BUCKET)
            _say(f"  S3  (SeaweedFS)        {s3.endpoint_url}  bucket {BUCKET}")
            _say(f"  GCS (fake-gcs-server)  {gcs.endpoint_url}  bucket {BUCKET}")
            stack.enter_context(_environment({**s3.client_env(), **gcs.client_env()}))
            root = workdir / "evals"
            root.mkdir(exist_ok=True)
            # model_validate: the demo ignores EVALSYNCD_* variables and config files.
            settings = Settings.model_validate(
                {
                    "root": root,
                    "state_dir": workdir / "state",
                    "flush_interval_s": 0.5,
                    "rescan_interval_s": 30.0,
                    "destinations": [
                        {
                            "name": "s3",
                            "url": f"s3://{BUCKET}/{PREFIX}",
                            "endpoint_url": s3.endpoint_url,
                        },
                        {"name": "gcs", "url": f"gs://{BUCKET}/{PREFIX}"},
                    ],
                }
            )
            _say(
                f"2. writer: {RUNS} runs x {len(BENCHMARKS)} benchmarks into {root}, "
                f"trajectories appended for {seconds:.0f} s; daemon mirroring to s3:// and gs://"
            )
            writer = _Writer(root, seconds, abort)
            if not asyncio.run(_mirror(settings, writer, abort)):
                _say("interrupted: cleaning up")
                return 130
            files, size = _local_summary(root)
            _say(
                f"3. daemon stopped (journal committed); local tree: {files} files, {format_bytes(size)}"
            )
            _say("4. verifying both buckets against the local tree (size + checksum)")
            verified = asyncio.run(_verify_all(settings))
            _say("5. reading the newest run back from each bucket with EvalStore")
            read_ok = _read_back(settings, writer.runs[-1])
            local_store = EvalStore(storage_from_uri(str(root)))
            local_runs = len(local_store.list_runs())
            ok = verified and read_ok and local_runs == RUNS
            _say(
                f"{'OK' if ok else 'FAILED'}: {local_runs} runs mirrored to S3 and GCS in "
                f"{time.monotonic() - t0:.1f} s"
            )
            return 0 if ok else 1
    except ServerError as exc:
        print(f"evalsyncd demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("interrupted: cleaning up")
        return 130
    finally:
        abort.set()
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
